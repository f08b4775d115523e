"""``apb eval``: robustness and speed of a checkpoint (ours, or a dense-with-zeros state dict)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import sparsity_report
from ..bench.checkpoint import (CheckpointError, _parse_config, _read_metadata, is_apb_checkpoint, load_checkpoint,
                                load_dense_model, read_state_dict, save_checkpoint)
from ..bench.env import environment
from ..bench.presets import get_preset
from ..bench.results import _finite, atomic_write_text
from ..bench.runner import evaluate_model, load_data, resolve_device
from ..data.datasets import DatasetNotFoundError
from ..models import adapt_state_dict
from .checks import _check_arch, _check_finite_weights, _check_model_size, _check_output, _download, _fail


def _cmd_eval(args, parser) -> int:
    path = Path(args.checkpoint)
    if not path.is_file():
        _fail(f"argument --checkpoint: no such file {str(path)!r}")
    if args.save_sparse:
        _check_output("--save-sparse", args.save_sparse, suffix=".safetensors")
    if args.out:
        _check_output("--out", args.out)
    preset = get_preset(args.preset).with_overrides(
        attack=args.attack, norm=args.norm, eps=args.eps, aa_samples=args.n_samples, fmn_samples=args.fmn_samples,
        check_samples=args.check_samples, fmn_steps=args.fmn_steps)
    dev = resolve_device(args.device)
    try:
        ours = is_apb_checkpoint(path, strict=True)
        if ours:
            cfg0 = _parse_config(path, (_read_metadata(path) or {})["apb_sparse_config"])
            _check_model_size("--checkpoint", cfg0["arch"], cfg0["num_classes"], cfg0["in_channels"],
                              cfg0.get("model_kwargs"))
            sparse, config = load_checkpoint(path)
            arch = config["arch"]
            extra = config.get("extra")
            dataset = args.dataset or (extra.get("dataset") if isinstance(extra, dict) else None)
            if not isinstance(dataset, str):
                _fail(f"argument --dataset: required ({path} does not record its dataset)")
            if args.download:
                _download([dataset], args.data_dir)
            data = load_data(dataset, preset.with_overrides(), args.data_dir)
            model, kind = sparse, "apb_sparse checkpoint"
        else:
            state = read_state_dict(path)  # a broken file is reported as such, before asking for --arch
            if not args.arch or not args.dataset:
                parser.error(f"arguments --arch and --dataset are required for a plain state dict checkpoint "
                             f"({path} is not an apb_sparse checkpoint)")
            arch, dataset = _check_arch(parser, args.arch, "--arch"), args.dataset
            # RobustBench's and bare timm state dicts differ from our layouts in names only.
            state, notes = adapt_state_dict(arch, state)
            normalize = args.normalize or ("none" if arch.startswith("robustbench:") else "dataset")
            if args.download:
                _download([dataset], args.data_dir)
            data = load_data(args.dataset, preset, args.data_dir)
            c = int(data.input_shape[0])
            norm_stats = (list(data.mean), list(data.std)) if normalize == "dataset" else ([0.0] * c, [1.0] * c)
            _check_model_size("--model-kwargs", arch, int(data.num_classes), c, args.model_kwargs)
            model = load_dense_model(path, arch, num_classes=int(data.num_classes), in_channels=c,
                                     model_kwargs=args.model_kwargs, normalization=norm_stats, state=state)
            sparse, kind = None, "dense state dict"
            if model.apb_normalization == "supplied":
                kind += (f", no normalisation buffers: inputs normalised with the {dataset} statistics"
                         if normalize == "dataset" else ", no normalisation buffers: inputs not normalised")
            if notes:
                kind += "; " + "; ".join(notes)
    except (CheckpointError, DatasetNotFoundError, FileNotFoundError) as e:
        _fail(f"argument --checkpoint: {e}" if isinstance(e, CheckpointError) else str(e))
    except (ValueError, TypeError) as e:  # an --arch / --model-kwargs / --dataset refused by name
        _fail(str(e))
    _check_finite_weights("--checkpoint", model, path)
    input_shape = tuple(int(s) for s in data.input_shape)
    report = sparsity_report(model, (1, *input_shape))
    print(f"{path} ({kind}): {arch} on {dataset}; detected sparsity {100 * report.sparsity:.2f} % "
          f"({report.nonzeros:,} nonzeros of {report.numel:,} conv/linear weights)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        result, sparse = evaluate_model(model, data, preset, seed=args.seed, device=dev, input_shape=input_shape,
                                        latency=not args.no_latency, sparse_model=sparse,
                                        progress=True)
    print(sparsity_report(sparse, (1, *input_shape)))
    aa, mn = result["autoattack"], result["min_norm"]
    print(f"\nclean {100 * result['clean_accuracy']:.2f} %   {aa['attack']} {preset.norm} eps={preset.eps:.4g}: "
          f"robust {100 * result['robust_accuracy']:.2f} % on {aa['n_samples']} images")
    err = mn.get("clean_error_share")
    print(f"FMN median min-norm distance {mn['median_distance']:.4f} over the correctly classified of "
          f"{mn['n_samples']} images" + (f" ({100 * err:.1f} % clean errors)" if err is not None else "")
          + "; masking checks: "
          + ", ".join(f"{c['name']}={'ok' if c['passed'] else 'FAILED'}" for c in mn["checks"]))
    lat = (result.get("latency") or {})
    for dev_name, l in lat.items():
        if "error" in l:
            print(f"{dev_name} latency: {l['error']}")
        else:
            print(f"{dev_name} latency (batch {l['batch']}, both deployed with apb_sparse.deploy): dense "
                  f"{l['dense_ms']:.3f} ms, sparse {l['sparse_ms']:.3f} ms, speedup {l['speedup']:.2f}x "
                  f"(vs eager dense torch {l['dense_eager_ms']:.3f} ms: {l['speedup_vs_eager']:.2f}x)")
            print(f"  speedup baseline (the leaderboard's): {l.get('baseline', '?')}")
    sz = result["size_bytes"]
    print(f"state dict size: dense {sz['dense']:,} B, sparse {sz['sparse']:,} B")
    if result["flags"]:
        print(f"flags: {' '.join(result['flags'])}")
    if args.save_sparse:
        save_checkpoint(sparse, args.save_sparse, arch=arch, num_classes=int(data.num_classes),
                        in_channels=int(data.input_shape[0]), model_kwargs=args.model_kwargs or {},
                        extra={"dataset": dataset, "source": str(path)})
        print(f"saved the sparse model to {args.save_sparse}")
    if args.out:
        doc = {"checkpoint": str(path), "kind": kind, "arch": arch, "dataset": dataset,
               "preset": preset.to_dict(), "environment": environment(), **result}
        atomic_write_text(args.out, json.dumps(_finite(doc), indent=1, default=str))
        print(f"wrote {args.out}")
    return 0
