"""``apb prune``: one method at one sparsity on one model, saved as a sparse checkpoint."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .. import densify, sparsify, sparsity_report
from .. import methods as registry
from ..bench.checkpoint import CheckpointError, is_apb_checkpoint, load_dense_model, read_state_dict, save_checkpoint
from ..bench.presets import get_preset
from ..bench.runner import build_model, get_base_model, load_data, make_recipe, resolve_device
from ..data.datasets import DatasetNotFoundError
from .checks import _check_arch, _check_methods, _check_output, _download, _fail, _load_apb_checkpoint


def _cmd_prune(args, parser) -> int:
    name = _check_methods(parser, [args.method], "--method")[0]
    cls = registry.get(name)
    if args.structure not in cls.structures:
        parser.error(f"argument --structure: {name} supports {list(cls.structures)}, got {args.structure!r}")
    preset = get_preset(args.preset).with_overrides(device=args.device)
    dataset = args.dataset or preset.datasets[0]
    arch = _check_arch(parser, args.arch, "--arch") if args.arch else preset.archs[0]
    out = Path(args.out or f"pruned-{name}-{args.structure}-{args.sparsity:g}.safetensors")
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    _check_output("--out", out)
    base_state = None
    if args.base:  # read (and so check) the base before any training
        try:
            if not is_apb_checkpoint(args.base, strict=True):
                base_state = read_state_dict(args.base)
        except (CheckpointError, FileNotFoundError) as e:
            _fail(f"argument --base: {e}")
    dev = resolve_device(preset.device)
    try:
        if args.download:
            _download([dataset], args.data_dir)
        data = load_data(dataset, preset, args.data_dir)
    except DatasetNotFoundError as e:
        _fail(str(e))
    if args.base:
        if base_state is None:
            base, _ = _load_apb_checkpoint("--base", args.base)
        else:
            try:
                base = load_dense_model(args.base, arch, num_classes=int(data.num_classes),
                                        in_channels=int(data.input_shape[0]), model_kwargs=preset.model_kwargs_for(arch),
                                        state=base_state)
            except CheckpointError as e:
                _fail(f"argument --base: {e}")
        base = densify(base).to(dev)
    else:
        work = Path(args.work_dir or os.path.join("runs", preset.name))
        base, _ = get_base_model(preset, arch, dataset, data, args.seed, work, device=dev, progress=not args.quiet)
    recipe = make_recipe(preset, arch, dataset, args.seed, progress=not args.quiet)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if cls.tags.pipeline == "A":
            res = cls().prune(base, data, sparsity=args.sparsity, structure=args.structure, recipe=recipe,
                              pretrained=True)
        else:
            res = cls().prune(build_model(preset, arch, data, args.seed).to(dev), data, sparsity=args.sparsity,
                              structure=args.structure, recipe=recipe, pretrained=False)
    sparse = sparsify(res.model.cpu()).eval()
    print(sparsity_report(sparse, (1, *data.input_shape)))
    save_checkpoint(sparse, out, arch=arch, num_classes=int(data.num_classes), in_channels=int(data.input_shape[0]),
                    model_kwargs=preset.model_kwargs_for(arch),
                    extra={"method": name, "structure": args.structure, "sparsity": args.sparsity, "seed": args.seed,
                           "dataset": dataset, "measured_sparsity": res.log.get("sparsity")})
    print(f"\n{name} pruned to {100 * res.log['sparsity']:.2f} % of prunable weights in {time.perf_counter() - t0:.1f} s; "
          f"saved {out} (+ {out.with_suffix('.json').name})\nevaluate it with: apb eval --checkpoint {out}")
    return 0
