"""RobustBench checkpoints load as they are: ``robustbench:*`` architectures have RobustBench's key
names and forward semantics, and ``apb eval`` evaluates such a file.

The expected key names and the reference forward passes below are written from RobustBench's
public model code (robustbench/model_zoo/architectures/wide_resnet.py and resnet.py: BasicBlock /
NetworkBlock / WideResNet, PreActBlock / PreActBlockV2 / PreActResNet) as a specification,
independently of apb_sparse.models.robustbench; the files are random weights saved the way
RobustBench's downloads are (a torch.save'd dict, "state_dict" wrapper, DataParallel prefix).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from apb_sparse.bench.checkpoint import load_dense_model
from apb_sparse.cli import main
from apb_sparse.models import adapt_state_dict, get_model
from apb_sparse.models.robustbench import RobustBenchWideResNet

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix, c):
    return {f"{prefix}.{k}": (c,) if k != "num_batches_tracked" else () for k in BN}


def wrn_spec(depth, widen, num_classes=10, sub_block1=False):
    """Key -> shape of RobustBench's WideResNet(depth, num_classes, widen_factor, sub_block1)."""
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    spec = {"conv1.weight": (16, 3, 3, 3)}
    stages = [("block1", ch[0], ch[1])] + ([("sub_block1", ch[0], ch[1])] if sub_block1 else []) + \
        [("block2", ch[1], ch[2]), ("block3", ch[2], ch[3])]
    for name, cin, cout in stages:
        for i in range(n):
            p, c_in = f"{name}.layer.{i}", cin if i == 0 else cout
            spec.update(_bn(f"{p}.bn1", c_in))
            spec[f"{p}.conv1.weight"] = (cout, c_in, 3, 3)
            spec.update(_bn(f"{p}.bn2", cout))
            spec[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if c_in != cout:  # equalInOut is False
                spec[f"{p}.convShortcut.weight"] = (cout, c_in, 1, 1)
    spec.update(_bn("bn1", ch[3]))
    spec.update({"fc.weight": (num_classes, ch[3]), "fc.bias": (num_classes,)})
    return spec


def preact_spec(bn_before_fc=False, num_classes=10):
    """Key -> shape of RobustBench's PreActResNet(PreActBlock[V2], [2, 2, 2, 2], bn_before_fc)."""
    spec = {"conv1.weight": (64, 3, 3, 3)}
    cin = 64
    for s, planes in enumerate((64, 128, 256, 512)):
        for j in range(2):
            p, stride = f"layer{s + 1}.{j}", (1 if s == 0 else 2) if j == 0 else 1
            spec.update(_bn(f"{p}.bn1", cin))
            spec[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            spec.update(_bn(f"{p}.bn2", planes))
            spec[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            if stride != 1 or cin != planes:
                spec[f"{p}.shortcut.0.weight"] = (planes, cin, 1, 1)
            cin = planes
    if bn_before_fc:
        spec.update(_bn("bn", 512))
    spec.update({"linear.weight": (num_classes, 512), "linear.bias": (num_classes,)})
    return spec


def random_state(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in spec.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith(".weight") and len(shape) == 1:  # BN scale
            out[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            out[k] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return out


def save_like_robustbench(state, path, extra=None):
    """A torch.save'd {"state_dict": {"module." + key: tensor}} plus a non-tensor entry."""
    torch.save({"state_dict": {"module." + k: v for k, v in {**state, **(extra or {})}.items()}, "epoch": 99}, path)


def _bn_f(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, 1e-5)


def wrn_reference(sd, x, depth):
    """RobustBench's WideResNet.forward, written out functionally."""
    n = (depth - 4) // 6
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for b, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        for i in range(n):
            p, s = f"{b}.layer.{i}", stride if i == 0 else 1
            equal = f"{p}.convShortcut.weight" not in sd
            act = F.relu(_bn_f(sd, f"{p}.bn1", out))
            h = F.relu(_bn_f(sd, f"{p}.bn2", F.conv2d(act, sd[f"{p}.conv1.weight"], stride=s, padding=1)))
            h = F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1)
            out = (out if equal else F.conv2d(act, sd[f"{p}.convShortcut.weight"], stride=s)) + h
    out = F.avg_pool2d(F.relu(_bn_f(sd, "bn1", out)), 8).flatten(1)
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])


def preact_reference(sd, x, v2, bn_before_fc):
    """RobustBench's PreActResNet.forward with PreActBlock (shortcut of the raw input) or
    PreActBlockV2 (shortcut of the activated input)."""
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for s in range(4):
        for j in range(2):
            p, stride = f"layer{s + 1}.{j}", (1 if s == 0 else 2) if j == 0 else 1
            act = F.relu(_bn_f(sd, f"{p}.bn1", out))
            if f"{p}.shortcut.0.weight" in sd:
                skip = F.conv2d(act if v2 else out, sd[f"{p}.shortcut.0.weight"], stride=stride)
            else:
                skip = out
            h = F.conv2d(act, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            out = F.conv2d(F.relu(_bn_f(sd, f"{p}.bn2", h)), sd[f"{p}.conv2.weight"], padding=1) + skip
    if bn_before_fc:
        out = F.relu(_bn_f(sd, "bn", out))
    return F.linear(F.avg_pool2d(out, 4).flatten(1), sd["linear.weight"], sd["linear.bias"])


def _ours(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("normalize.")}


@pytest.mark.parametrize("arch, spec", [
    ("robustbench:wrn28_10", lambda: wrn_spec(28, 10)),
    ("robustbench:wrn34_10", lambda: wrn_spec(34, 10)),
    ("robustbench:preact_resnet18", lambda: preact_spec()),
    (("robustbench:wrn", {"depth": 16, "widen": 4}), lambda: wrn_spec(16, 4)),
    ("robustbench:preact_resnet18_v2", lambda: preact_spec(bn_before_fc=True)),
])
def test_key_names_and_shapes_are_robustbenchs(arch, spec):
    name, kw = arch if isinstance(arch, tuple) else (arch, {})
    assert _ours(get_model(name, **kw)) == spec()


@pytest.mark.parametrize("depth", [10, 16])
def test_wrn_forward_matches_robustbenchs_semantics(depth):
    sd = random_state(wrn_spec(depth, 2), seed=depth)
    model = RobustBenchWideResNet(depth, 2).eval()
    state, notes = adapt_state_dict("robustbench:wrn28_10", {**sd, **{k: v for k, v in random_state(wrn_spec(depth, 2, sub_block1=True)).items()
                                              if k.startswith("sub_block1.")}})
    assert any("sub_block1" in n for n in notes)
    model.load_state_dict({**state, "normalize.mean": torch.zeros(1, 3, 1, 1), "normalize.std": torch.ones(1, 3, 1, 1)})
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wrn_reference(sd, x, depth), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("v2", [False, True])
def test_preact_forward_matches_robustbenchs_semantics(v2):
    sd = random_state(preact_spec(bn_before_fc=v2), seed=int(v2))
    model = get_model("robustbench:preact_resnet18_v2" if v2 else "robustbench:preact_resnet18").eval()
    model.load_state_dict({**sd, "normalize.mean": torch.zeros(1, 3, 1, 1), "normalize.std": torch.ones(1, 3, 1, 1)})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = preact_reference(sd, x, v2, v2)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        # the two blocks really differ: the other variant's semantics give another function
        assert not torch.allclose(ref, preact_reference(sd, x, not v2, v2), atol=1e-3)


def test_a_wrn28_10_file_in_robustbench_layout_loads_strictly(tmp_path):
    """The file as RobustBench stores it (wrapper, module. prefix, unused sub_block1 branch, mu /
    sigma of a model that normalises) loads into robustbench:wrn28_10 with nothing missing."""
    sd = random_state(wrn_spec(28, 10, sub_block1=True))
    mu, sigma = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1), torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    path = tmp_path / "Carmon2019Unlabeled.pt"
    save_like_robustbench(sd, path, extra={"mu": mu, "sigma": sigma})
    from apb_sparse.bench.checkpoint import read_state_dict
    state, notes = adapt_state_dict("robustbench:wrn28_10", read_state_dict(path))
    model = load_dense_model(path, "robustbench:wrn28_10", state=state, normalization=([0.0] * 3, [1.0] * 3))
    assert model.apb_normalization == "checkpoint"  # mu / sigma came from the file
    assert torch.equal(model.normalize.mean, mu) and torch.equal(model.normalize.std, sigma)
    assert torch.equal(model.block1.layer[0].convShortcut.weight, sd["block1.layer.0.convShortcut.weight"])
    assert len(notes) == 2
    # a file of another architecture is refused by name (strict loading)
    from apb_sparse.bench.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="missing keys"):
        load_dense_model(path, "robustbench:wrn34_10", state=state, normalization=([0.0] * 3, [1.0] * 3))


EVAL_FAST = ["--dataset", "synthetic-cifar10", "--n-samples", "8", "--fmn-samples", "4", "--check-samples", "4",
             "--fmn-steps", "3", "--no-latency"]


def test_apb_eval_evaluates_a_robustbench_checkpoint_as_it_is(tmp_path, capsys):
    """`apb eval` on a file saved as RobustBench's downloads are (wrapper, module. prefix, unused
    sub_block1 branch); the evaluated function is RobustBench's forward on [0, 1] inputs.  A
    WRN-10-1 keeps the attacks cheap; WRN-28-10 files take the same path (the strict-load test)."""
    sd = random_state(wrn_spec(10, 1, sub_block1=True), seed=3)
    path = tmp_path / "rb-wrn-10-1.pt"
    save_like_robustbench(sd, path)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(path), "--arch", "robustbench:wrn", "--model-kwargs",
               '{"depth": 10, "widen": 1}', *EVAL_FAST, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "inputs not normalised" in text and "sub_block1" in text
    doc = json.loads(out.read_text())
    assert doc["arch"] == "robustbench:wrn"
    from apb_sparse.data import get_dataset
    x, y = get_dataset("synthetic-cifar10").tensors("test", 8)
    with torch.no_grad():
        acc = float((wrn_reference(sd, x, 10).argmax(1) == y).float().mean())
    assert doc["clean_accuracy"] == pytest.approx(acc)


def test_a_bare_timm_state_dict_loads_by_name(tmp_path):
    """A state dict saved from a bare timm model (timm's own key names) loads strictly into
    --arch timm:<name> the way `apb eval` loads it (adapt_state_dict, then load_dense_model), and
    computes the same function.  (The full `apb eval` of this file passed too, but takes minutes of
    attacks on 2 CPU cores: the robustbench test above covers the command end to end.)"""
    timm = pytest.importorskip("timm")
    from apb_sparse.bench.checkpoint import read_state_dict

    torch.manual_seed(0)
    bare = timm.create_model("resnet18", num_classes=10).eval()
    path = tmp_path / "timm-resnet18.pt"
    torch.save(bare.state_dict(), path)
    state, notes = adapt_state_dict("timm:resnet18", read_state_dict(path))
    assert notes == ["keys of a bare timm model: prefixed with 'model.'"]
    model = load_dense_model(path, "timm:resnet18", state=state, normalization=([0.0] * 3, [1.0] * 3))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare(x))
