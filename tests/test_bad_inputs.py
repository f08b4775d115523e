"""Inputs that used to crash the process (segfaults, overflowing size arithmetic) or to give raw
library errors.  Each case runs in a subprocess, so that a crash fails its test instead of killing
the suite; each must end in a clean Python exception whose message names the bad argument (or,
for inputs that are valid, in the right result)."""
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import re, sys
import torch, torch.nn as nn, torch.nn.functional as F
from apb_sparse import ops
from apb_sparse.nn import MaskedConv2d, SparseConv2d, SparseLinear, ChannelSparseConv2d

class Failed(Exception):
    pass

def expect(exc_type, pattern, fn):
    try:
        fn()
    except exc_type as exc:
        if not re.search(pattern, str(exc)):
            raise Failed(f"wrong message (expected {pattern!r}): {type(exc).__name__}: {exc}")
        return
    except Exception as exc:
        raise Failed(f"wrong type (expected {exc_type.__name__}): {type(exc).__name__}: {exc}")
    raise Failed(f"no error (expected {exc_type.__name__} matching {pattern!r})")

def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

x = torch.randn(2, 3, 6, 6)
conv = nn.Conv2d(3, 4, 3, padding=1)
with torch.no_grad():
    conv.weight.mul_((torch.rand_like(conv.weight) > 0.7).float())
"""

CASES = {
    # ---- empty / corrupted CSR reaching the kernels (segfaults before) ----
    "linear_empty_row_ptr": """
e = torch.empty(0, dtype=torch.int32)
expect(RuntimeError, "row_ptr", lambda: ops.sparse_linear(torch.randn(2, 3), torch.empty(0), e, e, 3))
expect(RuntimeError, "row_ptr", lambda: torch.ops.apb_sparse.sparse_linear(torch.randn(2, 3), torch.empty(0), e, e, 3, None))
expect(RuntimeError, "row_ptr",
       lambda: torch.ops.apb_sparse.sparse_linear_backward_input(torch.randn(2, 0), torch.empty(0), e, e, 3))
""",
    "linear_negative_in_features": """
v, rp, ci = ops.pack_csr(torch.randn(4, 3))
expect(RuntimeError, "in_features",
       lambda: torch.ops.apb_sparse.sparse_linear_backward_input(torch.randn(2, 4), v, rp, ci, -5))
""",
    "conv_empty_row_ptr": """
e = torch.empty(0, dtype=torch.int32)
expect(RuntimeError, "row_ptr", lambda: ops.sparse_conv2d(x, torch.empty(0), e, e, (4, 3, 3, 3)))
""",
    "csr_corrupt_row_ptr_values": """
v, rp, ci = ops.pack_csr(conv.weight)
bad = rp.clone(); bad[-1] = 2**31 - 1
expect(RuntimeError, "row_ptr", lambda: ops.sparse_conv2d(x, v, bad, ci, conv.weight.shape))
bad = rp.clone(); bad[1] = -7
expect(RuntimeError, "row_ptr", lambda: ops.sparse_conv2d(x, v, bad, ci, conv.weight.shape))
bad = rp.clone(); bad[0] = 1
expect(RuntimeError, "row_ptr", lambda: ops.sparse_conv2d(x, v, bad, ci, conv.weight.shape))
bad = ci.clone(); bad[-1] = -1
expect(RuntimeError, "col_idx", lambda: ops.sparse_conv2d(x, v, rp, bad, conv.weight.shape))
""",
    # ---- stride / dilation / padding sizes that overflowed the geometry ----
    "stride_2_32_all_layers": """
ref_conv = nn.Conv2d(3, 4, 3, stride=2**32, padding=1)
with torch.no_grad():
    ref_conv.weight.mul_((torch.rand_like(ref_conv.weight) > 0.7).float())
ref = ref_conv(x)
close(SparseConv2d.from_dense(ref_conv)(x), ref)
masked = MaskedConv2d.from_dense(ref_conv, (ref_conv.weight != 0).float())
xg = x.clone().requires_grad_(True)
out = masked(xg)
close(out, ref)
out.sum().backward()
xr = x.clone().requires_grad_(True)
ref_conv(xr).sum().backward()
close(xg.grad, xr.grad)
v, rp, ci = ops.pack_csr(ref_conv.weight)
g = torch.ones_like(ref)
gi = torch.ops.apb_sparse.sparse_conv2d_backward_input(g, v, rp, ci, list(ref_conv.weight.shape), list(x.shape),
                                                       [2**32, 2**32], [1, 1], [1, 1], 1)
close(gi, xr.grad)
close(SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, stride=(2**32, 1)))(x).shape[-2:], torch.Size([1, 4]))
print("OK")
""",
    "stride_2_62": """
ref_conv = nn.Conv2d(3, 4, 3, stride=2**62)
close(SparseConv2d.from_dense(ref_conv)(x), ref_conv(x))
""",
    "dilation_2_62": """
# F.conv2d itself overflows here (returns a 6x6 map); the kernel must refuse, naming the dilation.
w = torch.randn(4, 3, 3, 3)
v, rp, ci = ops.pack_csr(w)
expect(RuntimeError, "dilat", lambda: ops.sparse_conv2d(x, v, rp, ci, w.shape, dilation=2**62))
expect(RuntimeError, "dilat", lambda: ops.masked_conv2d(x, w, torch.ones_like(w), dilation=2**62))
expect(RuntimeError, "dilat", lambda: SparseConv2d(3, 4, 3, dilation=2**62)(x))
""",
    "huge_padding": """
w = torch.randn(4, 3, 3, 3)
v, rp, ci = ops.pack_csr(w)
expect(RuntimeError, "padding", lambda: ops.sparse_conv2d(x, v, rp, ci, w.shape, padding=2**40))
expect(RuntimeError, "too large", lambda: ops.sparse_conv2d(x, v, rp, ci, w.shape, padding=2**30))
expect(RuntimeError, "padding", lambda: ops.masked_conv2d(x, w, torch.ones_like(w), padding=2**62))
expect(RuntimeError, "padding", lambda: torch.ops.apb_sparse.sparse_conv2d_backward_input(
    torch.randn(2, 4, 6, 6), v, rp, ci, list(w.shape), list(x.shape), [1, 1], [2**40, 1], [1, 1], 1))
""",
    "huge_batch": """
# A 2^50-image batch (an expanded view: no memory) must be refused before any allocation.
big = torch.zeros(1, 3, 6, 6).expand(2**50, 3, 6, 6)
w = torch.randn(4, 3, 3, 3)
v, rp, ci = ops.pack_csr(w)
expect(RuntimeError, "too large", lambda: ops.sparse_conv2d(big, v, rp, ci, w.shape))
""",
    "huge_weight_size": """
w = torch.randn(4, 3, 3, 3)
v, rp, ci = ops.pack_csr(w)
expect(RuntimeError, "weight_size", lambda: torch.ops.apb_sparse.sparse_conv2d(
    x, v, rp, ci, [4, 3, 2**40, 3], None, [1, 1], [0, 0], [1, 1], 1, None, False))
expect(RuntimeError, "weight_size", lambda: torch.ops.apb_sparse.sparse_conv2d(
    x, v, rp, ci, [4, 2**40, 3, 3], None, [1, 1], [0, 0], [1, 1], 1, None, False))
expect(RuntimeError, "weight_size", lambda: torch.ops.apb_sparse.sparse_conv2d(
    x, v, rp, ci, [4, 3, -3, 3], None, [1, 1], [0, 0], [1, 1], 1, None, False))
""",
    "backward_bad_input_size": """
w = torch.randn(4, 3, 3, 3)
v, rp, ci = ops.pack_csr(w)
expect(RuntimeError, "input must be 4-D", lambda: torch.ops.apb_sparse.sparse_conv2d_backward_input(
    torch.randn(2, 4, 4, 4), v, rp, ci, list(w.shape), [2, 3, 6], [1, 1], [0, 0], [1, 1], 1))
expect(RuntimeError, "grad_output has shape", lambda: torch.ops.apb_sparse.sparse_conv2d_backward_input(
    torch.randn(2, 4, 5, 4), v, rp, ci, list(w.shape), [2, 3, 6, 6], [1, 1], [0, 0], [1, 1], 1))
expect(RuntimeError, "input size must be non-negative", lambda: torch.ops.apb_sparse.masked_conv2d_backward_input(
    torch.randn(2, 4, 4, 4), w, torch.ones_like(w), [2, 3, -6, 6], [1, 1], [0, 0], [1, 1], 1))
""",
    # ---- tampered state dicts ----
    "tampered_linear_row_ptr": """
lin = nn.Linear(5, 4)
layer = SparseLinear.from_dense(lin)
sd = {k: v.clone() for k, v in layer.state_dict().items()}
sd["row_ptr"] = torch.tensor([0, 5, 10, 15, 20, 20], dtype=torch.int32)  # one more output row
fresh = SparseLinear.from_dense(lin)
expect(RuntimeError, "row_ptr", lambda: fresh.load_state_dict(sd))
close(fresh(torch.ones(2, 5)), lin(torch.ones(2, 5)))  # the layer is unchanged
assert fresh.row_ptr.numel() == 5
""",
    "tampered_col_idx": """
layer = SparseConv2d.from_dense(conv)
for change, pattern in [(lambda c: c.fill_(10_000), "col_idx entry"), (lambda c: c.__setitem__(1, int(c[0])),
                        "repeats a column"), (lambda c: c.__setitem__(0, -1), "col_idx entry")]:
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    if int(sd["row_ptr"][1]) < 2:
        continue
    change(sd["col_idx"])
    expect(RuntimeError, pattern, lambda: SparseConv2d.from_dense(conv).load_state_dict(sd))
sd = {k: v.clone() for k, v in layer.state_dict().items()}
sd["col_idx"] = sd["col_idx"].long()
expect(RuntimeError, "col_idx must be int32", lambda: SparseConv2d.from_dense(conv).load_state_dict(sd))
sd = {k: v.clone() for k, v in layer.state_dict().items()}
sd["values"] = sd["values"][:-1]
expect(RuntimeError, "col_idx has", lambda: SparseConv2d.from_dense(conv).load_state_dict(sd))
""",
    "tampered_channel_index": """
layer = ChannelSparseConv2d.from_dense(conv)
sd = {k: v.clone() for k, v in layer.state_dict().items()}
sd["in_index"] = sd["in_index"] + 100
expect(RuntimeError, "in_index", lambda: ChannelSparseConv2d.from_dense(conv).load_state_dict(sd))
sd = {k: v.clone() for k, v in layer.state_dict().items()}
sd["weight"] = sd["weight"][:, :1]
expect(RuntimeError, "weight has shape", lambda: ChannelSparseConv2d.from_dense(conv).load_state_dict(sd))
""",
}


RUNNER = """
import json, sys, traceback
cases = json.loads(sys.stdin.read())
for name, code in cases:
    print("START", name, flush=True)
    try:
        exec(code, dict(globals()))
        print("PASS", name, flush=True)
    except Exception as exc:
        print("FAIL", name, json.dumps(f"{type(exc).__name__}: {exc}"), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes():
    """Runs every case in one subprocess (importing torch costs seconds per process); a crash ends
    that process and fails the case that was running, and the cases after it run in a new one."""
    import json

    names = sorted(CASES)
    result = {}
    while names:
        payload = json.dumps([(n, textwrap.dedent(CASES[n])) for n in names])
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + RUNNER], input=payload,
                              capture_output=True, text=True, timeout=600)
        started = None
        for line in proc.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "START":
                started = rest
            elif word == "PASS":
                result[rest] = None
                started = None
            elif word == "FAIL":
                name, _, msg = rest.partition(" ")
                result[name] = json.loads(msg)
                started = None
        if started is None:  # the runner finished (or failed before any case: reported on every case)
            for n in names:
                result.setdefault(n, f"runner exited with rc={proc.returncode}: {proc.stderr[-2000:]}")
            break
        signal = -proc.returncode if proc.returncode < 0 else None
        result[started] = f"crashed (rc={proc.returncode}, signal {signal})\n{proc.stderr[-2000:]}"
        names = [n for n in names if n not in result]
    return result


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clean_error(outcomes, case):
    assert outcomes[case] is None, f"{case}: {outcomes[case]}"
