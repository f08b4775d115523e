"""Conversion survey over timm CNNs: sparsify, deploy and compact give the dense model's outputs,
and compact removes the channels that coupled filter masks zero.

For each model: per-layer magnitude masks (unstructured, 90 %) -> ``sparsify`` and ``deploy`` must
match the masked model; coupled filter masks (50 %) + ``zero_dead_batchnorm`` -> ``compact`` must
match and report what it removed.  Needs ``pip install timm``; 32x32 inputs keep it quick.

    python benchmarks/timm_survey.py [--models resnet18 efficientnet_b0 ...]

Writes benchmarks/results/timm_survey.json.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

import apb_sparse

DEFAULT = ["resnet18", "resnet10t", "resnet26d", "seresnet18", "efficientnet_b0", "mobilenetv3_small_050",
           "mobilenetv2_050", "regnetx_002", "regnety_002", "dla34", "densenet121", "ghostnet_050",
           "mnasnet_050", "cspresnet50", "rexnet_100", "vgg11_bn", "dpn48b", "hrnet_w18_small",
           "resnetv2_50x1_bit", "nf_resnet26", "tinynet_e", "lcnet_050", "fbnetc_100", "semnasnet_050", "repvgg_a0"]


def _close(a, b) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def survey(name: str) -> dict:
    import timm

    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    row = {"model": name}
    masked = apb_sparse.apply_masks(m, apb_sparse.magnitude_masks(m, 0.9))
    with torch.no_grad():
        ref = masked(x)
        s = apb_sparse.sparsify(masked)
        row["sparsify_err"] = _close(s(x), ref)
        choices = s.apb_sparse_choices
        row["layers"] = len(choices)
        row["converted"] = sum(c.layout != "dense" for c in choices.values())
        row["left_dense"] = {n: c.reason for n, c in choices.items() if c.reason}
        d = apb_sparse.deploy(masked, x)
        row["deploy_err"] = _close(d(x), ref)
        row["deploy_info"] = {k: (v if k != "traces" else list(v.values())) for k, v in d.apb_deploy_info.items()}
        row["batchnorms_left"] = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in d.modules())
        try:
            cm = apb_sparse.apply_masks(m, apb_sparse.magnitude_masks(m, 0.5, structure="filter", coupled=True,
                                                                     example_input=x[:1]))
            apb_sparse.zero_dead_batchnorm(cm)
            cref = cm(x)
            small = apb_sparse.compact(cm, x)
            row["compact_err"] = _close(small(x), cref)
            row["compact_removed"] = sum(small.apb_compact_removed.values())
            before = apb_sparse.sparsity_report(cm, tuple(x.shape)).dense_macs
            after = apb_sparse.sparsity_report(small, tuple(x.shape)).dense_macs
            row["compact_mac_ratio"] = after / before
        except Exception as e:  # noqa: BLE001 - recorded per model
            row["compact_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--out", default="benchmarks/results/timm_survey.json")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        try:
            row = survey(name)
        except Exception as e:  # noqa: BLE001 - a model timm cannot build here, or our failure: recorded
            row = {"model": name, "error": f"{type(e).__name__}: {str(e)[:300]}",
                   "where": traceback.format_exc().splitlines()[-3:]}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("left_dense", "deploy_info")}), flush=True)
    Path(args.out).write_text(json.dumps({"timm": __import__("timm").__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
