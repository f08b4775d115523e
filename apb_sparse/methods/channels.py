"""Filter pruning's channels: find the BatchNorm after each conv and keep pruned channels at zero.

A pruned filter's conv bias and its following BatchNorm channel (weight and bias) are kept exactly
zero during training, so that ``apb_sparse.compact`` can remove the channel.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import Tensor, nn

from ..nn.masked import MaskedConv2d

__all__ = ["following_batchnorms", "zero_pruned_channels_"]

def following_batchnorms(model: nn.Module, example: Tensor) -> Dict[nn.Module, nn.Module]:
    """Map each conv to the BatchNorm2d that directly consumes its output (if any).

    Found by running ``example`` once and matching tensor identity (the BN's input *is* the
    conv's output), which is exact for any architecture, residual or not.
    """
    outputs: Dict[int, nn.Module] = {}
    pairs: Dict[nn.Module, nn.Module] = {}
    hooks = []

    def conv_hook(mod, inp, out):
        outputs[id(out)] = mod

    def bn_hook(mod, inp):
        src = outputs.get(id(inp[0]))
        if src is not None:
            pairs[src] = mod

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            keep_alive = []  # hold outputs so ids are not reused during the pass

            def hold(mod, inp, out):
                keep_alive.append(out)
            hooks += [m.register_forward_hook(hold) for m in model.modules() if isinstance(m, nn.Conv2d)]
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pairs


@torch.no_grad()
def zero_pruned_channels_(layers: Iterable[nn.Module], bn_of: Dict[nn.Module, nn.Module]) -> None:
    """For every conv filter whose mask row is all zero: zero its bias and its BatchNorm channel.

    Call after each optimiser step (train's ``on_step``) so the channel stays exactly zero and
    ``apb_sparse.compact`` can remove it.
    """
    for layer in layers:
        if not isinstance(layer, MaskedConv2d):
            continue
        dead = layer.weight_mask.flatten(1).amax(dim=1) == 0
        if not bool(dead.any()):
            continue
        if layer.bias is not None:
            layer.bias[dead] = 0
        bn = bn_of.get(layer)
        if bn is not None:
            if bn.weight is not None:
                bn.weight[dead] = 0
            if bn.bias is not None:
                bn.bias[dead] = 0
