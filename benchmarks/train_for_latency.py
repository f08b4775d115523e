#!/usr/bin/env python
"""Train a CIFAR-geometry model (3x32x32 input, 10 classes) on Fashion-MNIST for the latency runs.

The speed targets are to hold on trained, not randomly initialised, weights: magnitude masks (global
ones above all) depend on how training spreads the weight magnitudes over the layers. No CIFAR-10
can be had here, so the architectures are trained on Fashion-MNIST (Debian's
``dataset-fashion-mnist``), each 28x28 image zero-padded to 32x32 and repeated over the 3 input
channels, so the model has exactly the CIFAR geometry that ``benchmarks/latency.py`` times.

Plain (not adversarial) training, SGD with momentum and a one-cycle learning rate, for a fixed
number of steps; the test accuracy is printed and stored next to the weights (safetensors).

    python benchmarks/train_for_latency.py --arch resnet18 --steps 300 --out /tmp/resnet18_fmnist.safetensors
    python benchmarks/latency.py --weights resnet18=/tmp/resnet18_fmnist.safetensors ...
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from apb_sparse.data import get_dataset
from apb_sparse.models import get_model


def cifar_geometry(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) -> (N, 3, 32, 32): zero-pad by 2 pixels, repeat over 3 channels."""
    return F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="model name (apb_sparse.models)")
    p.add_argument("--steps", type=int, default=300, help="SGD steps (batch --batch-size)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--test-samples", type=int, default=2000, help="test images for the accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="safetensors file for the state dict")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0:
        p.error("--steps and --batch-size must be > 0")

    torch.manual_seed(args.seed)
    data = get_dataset("fashion-mnist")
    x_train, y_train = data.tensors("train")
    x_test, y_test = data.tensors("test", args.test_samples)
    model = get_model(args.arch)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x_train), generator=gen)
    t0 = time.perf_counter()
    model.train()
    pos = 0
    for step in range(args.steps):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(x_train), generator=gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        loss = F.cross_entropy(model(cifar_geometry(x_train[idx])), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.0f} s", flush=True)
    model.eval()
    with torch.inference_mode():
        correct = sum((model(cifar_geometry(x_test[i:i + 500])).argmax(1) == y_test[i:i + 500]).sum().item()
                      for i in range(0, len(x_test), 500))
    acc = correct / len(x_test)
    meta = {"arch": args.arch, "dataset": "fashion-mnist (padded to 32x32, 3 channels)", "steps": str(args.steps),
            "batch_size": str(args.batch_size), "lr": str(args.lr), "seed": str(args.seed),
            "test_accuracy": f"{acc:.4f}", "test_samples": str(len(x_test)),
            "train_seconds": f"{time.perf_counter() - t0:.0f}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=meta)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
