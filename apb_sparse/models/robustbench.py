"""CIFAR architectures in RobustBench's checkpoint key layout (WRN-28-10, WRN-34-10, PreAct-ResNet-18).

A checkpoint downloaded by RobustBench (``models/cifar10/Linf/<name>.pt``) is a plain state dict
whose key names come from RobustBench's model classes (``robustbench/model_zoo/architectures/
wide_resnet.py`` and ``resnet.py``): ``block1.layer.0.convShortcut.weight``, ``layer1.0.shortcut.0.weight``,
``fc`` / ``linear`` heads.  The modules below are written for this package (normalisation inside the
model, non-inplace ReLUs so hooks and masks see every activation) but name their parameters exactly
as those classes do, so such a file loads strictly with ``apb eval --arch robustbench:wrn28_10``.

Three differences from our own ``wrn28_4`` / ``preact_resnet18`` make a separate layout necessary:
the parameter names, the WRN blocks nested one level deeper (``blockN.layer.M``), and
RobustBench's PreAct block, whose projection shortcut reads the *raw* block input (ours, like
He et al.'s reference code, reads the activated input; RobustBench's ``PreActBlockV2`` does too).

Input normalisation: RobustBench checkpoints carry none (most listed CIFAR models take [0, 1]
inputs unnormalised; those that normalise keep ``mu`` / ``sigma`` in the model class, and their
files usually lack them).  :func:`adapt_state_dict` maps ``mu`` / ``sigma`` to our
``normalize.mean`` / ``normalize.std`` when a file has them and drops the unused ``sub_block1``
branch that ``WideResNet(sub_block1=True)`` saves.  Without ``mean`` / ``std`` these models do not
normalise (mean 0, std 1): the usual RobustBench convention.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from .common import check_classes, make_normalize

__all__ = ["RobustBenchWideResNet", "RobustBenchPreActResNet", "rb_wrn28_10", "rb_wrn34_10",
           "rb_preact_resnet18", "rb_preact_resnet18_v2", "adapt_state_dict", "ROBUSTBENCH_ARCHS"]


def _identity_stats(in_channels: int, mean, std):
    # RobustBench's convention: no normalisation unless the model (or the caller) asks for it.
    if mean is None:
        mean = (0.0,) * in_channels
    if std is None:
        std = (1.0,) * in_channels
    return mean, std


class _WideBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; ``convShortcut`` (1x1) on the activated input when the channel
    count changes, otherwise the raw input is added (RobustBench's ``BasicBlock`` semantics)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        # RobustBench decides on channel equality alone (a stride-2 block always changes width).
        self.equal_in_out = in_planes == out_planes
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class _Stage(nn.Module):
    """``layer``: the blocks of one stage (RobustBench's ``NetworkBlock``)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class RobustBenchWideResNet(nn.Module):
    """WRN-``depth``-``widen`` with RobustBench's key names (``conv1``, ``block1..3.layer.N``,
    ``bn1``, ``fc``), preceded by ``normalize``.

    Args:
        depth: 6n+4 (28 or 34 for RobustBench's CIFAR models).
        widen: width multiplier (10).
        num_classes, in_channels: as for the other models.
        mean, std: input normalisation (default: none, i.e. 0 / 1).
        bias_last: whether ``fc`` has a bias (RobustBench's default True).
    """

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_channels: int = 3, *,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 bias_last: bool = True):
        super().__init__()
        check_classes(num_classes)
        if not isinstance(depth, int) or (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (e.g. 28, 34), got {depth!r}")
        if not isinstance(widen, int) or widen < 1:
            raise ValueError(f"widen must be a positive int, got {widen!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = make_normalize(in_channels, *_identity_stats(in_channels, mean, std))
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _Stage(n, widths[0], widths[1], 1)
        self.block2 = _Stage(n, widths[1], widths[2], 2)
        self.block3 = _Stage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        # RobustBench pools with avg_pool2d(out, 8): the same as a global pool for 32x32 inputs.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes, bias=bias_last)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.fc(self.flatten(self.pool(self.relu(self.bn1(out)))))


class _PreActBlock(nn.Module):
    """RobustBench's pre-activation block: ``shortcut.0`` (1x1 conv) applied to the raw input
    (``PreActBlock``) or to the activated input (``v2=True``, ``PreActBlockV2``)."""

    def __init__(self, in_planes: int, planes: int, stride: int, v2: bool):
        super().__init__()
        self.v2 = v2
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.has_projection = stride != 1 or in_planes != planes
        if self.has_projection:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        if self.has_projection:
            skip = self.shortcut(pre if self.v2 else x)
        else:
            skip = x
        return self.conv2(self.relu2(self.bn2(self.conv1(pre)))) + skip


class RobustBenchPreActResNet(nn.Module):
    """PreAct-ResNet with RobustBench's key names (``conv1``, ``layer1..4.N``, optional ``bn``,
    ``linear``), preceded by ``normalize``.

    Args:
        num_blocks: blocks per stage ((2, 2, 2, 2) for PreAct-ResNet-18).
        v2: RobustBench's ``PreActBlockV2`` (projection on the activated input) instead of
            ``PreActBlock`` (projection on the raw input).
        bn_before_fc: a final BN-ReLU (``bn``) before the pool, as RobustBench's
            ``bn_before_fc=True`` models have.
        num_classes, in_channels, mean, std: as for :class:`RobustBenchWideResNet`.
    """

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 *, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 v2: bool = False, bn_before_fc: bool = False):
        super().__init__()
        check_classes(num_classes)
        if len(num_blocks) != 4 or any(int(n) < 1 for n in num_blocks):
            raise ValueError(f"num_blocks must be four positive ints, got {num_blocks!r}")
        self.normalize = make_normalize(in_channels, *_identity_stats(in_channels, mean, std))
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        in_planes = 64
        for i, n in enumerate(num_blocks):
            planes = 64 * 2 ** i
            blocks = []
            for j in range(int(n)):
                blocks.append(_PreActBlock(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1, v2))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn_before_fc = bn_before_fc
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(in_planes)
            self.relu = nn.ReLU()
        # RobustBench pools with avg_pool2d(out, 4): a global pool for 32x32 inputs.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_before_fc:
            out = self.relu(self.bn(out))
        return self.linear(self.flatten(self.pool(out)))


def _no_override(kw: dict, fixed: Dict[str, object], name: str) -> None:
    clash = sorted(k for k in fixed if k in kw and kw[k] != fixed[k])
    if clash:
        raise ValueError(f"{name} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; got "
                         f"{', '.join(f'{k}={kw[k]!r}' for k in clash)} (use RobustBenchWideResNet / "
                         "RobustBenchPreActResNet directly for other shapes)")
    for k in fixed:
        kw.pop(k, None)


def rb_wrn28_10(num_classes: int = 10, in_channels: int = 3, **kw) -> RobustBenchWideResNet:
    """WRN-28-10 in RobustBench's layout (36.5 M parameters; e.g. Carmon2019Unlabeled, Standard)."""
    _no_override(kw, {"depth": 28, "widen": 10}, "robustbench:wrn28_10")
    return RobustBenchWideResNet(28, 10, num_classes, in_channels, **kw)


def rb_wrn34_10(num_classes: int = 10, in_channels: int = 3, **kw) -> RobustBenchWideResNet:
    """WRN-34-10 in RobustBench's layout (46.2 M parameters; e.g. Zhang2019Theoretically)."""
    _no_override(kw, {"depth": 34, "widen": 10}, "robustbench:wrn34_10")
    return RobustBenchWideResNet(34, 10, num_classes, in_channels, **kw)


def rb_preact_resnet18(num_classes: int = 10, in_channels: int = 3, **kw) -> RobustBenchPreActResNet:
    """PreAct-ResNet-18 in RobustBench's layout with ``PreActBlock`` (e.g. Wong2020Fast,
    Andriushchenko2020Understanding)."""
    return RobustBenchPreActResNet((2, 2, 2, 2), num_classes, in_channels, **kw)


def rb_preact_resnet18_v2(num_classes: int = 10, in_channels: int = 3, **kw) -> RobustBenchPreActResNet:
    """PreAct-ResNet-18 with ``PreActBlockV2`` and ``bn_before_fc`` (e.g. Rice2020Overfitting's L2
    model, Kireev2021Effectiveness)."""
    _no_override(kw, {"v2": True, "bn_before_fc": True}, "robustbench:preact_resnet18_v2")
    return RobustBenchPreActResNet((2, 2, 2, 2), num_classes, in_channels, v2=True, bn_before_fc=True, **kw)


ROBUSTBENCH_ARCHS = {
    "wrn28_10": rb_wrn28_10,
    "wrn34_10": rb_wrn34_10,
    "preact_resnet18": rb_preact_resnet18,
    "preact_resnet18_v2": rb_preact_resnet18_v2,
}


def adapt_state_dict(state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """A RobustBench state dict with our names for what differs; returns it and notes for the user.

    * ``mu`` / ``sigma`` (the normalisation buffers of RobustBench models that normalise inside)
      become ``normalize.mean`` / ``normalize.std``;
    * ``sub_block1.*`` (a branch ``WideResNet(sub_block1=True)`` builds and saves but never runs)
      is dropped.
    """
    out: Dict[str, Tensor] = {}
    notes: List[str] = []
    dropped = [k for k in state if k.startswith("sub_block1.")]
    for k, v in state.items():
        if k.startswith("sub_block1."):
            continue
        if k in ("mu", "sigma"):
            out["normalize.mean" if k == "mu" else "normalize.std"] = v.reshape(1, -1, 1, 1)
            continue
        out[k] = v
    if dropped:
        notes.append(f"dropped {len(dropped)} sub_block1.* tensors (a branch RobustBench's WideResNet "
                     "saves but never runs)")
    if "mu" in state or "sigma" in state:
        notes.append("input normalisation from the checkpoint's mu / sigma")
    return out, notes
