"""Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation blocks; WRN-28-4, -28-10 and -34-10."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .common import check_classes, make_normalize

__all__ = ["WideBasicBlock", "WideResNet", "wrn28_4", "wrn28_10", "wrn34_10"]


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 projection on the activated input when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.has_projection = stride != 1 or in_planes != planes
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if self.has_projection else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        skip = self.shortcut(pre) if self.has_projection else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: three stages of (depth-4)/6 blocks with 16k, 32k, 64k channels.

    Args:
        depth: total depth, 6n+4.
        widen: width multiplier k.
        num_classes, in_channels, mean, std: as for the other models.
        dropout: dropout between the two convolutions of a block (0 disables it).
    """

    def __init__(self, depth: int = 28, widen: int = 4, num_classes: int = 10, in_channels: int = 3,
                 *, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 dropout: float = 0.0):
        super().__init__()
        check_classes(num_classes)
        if isinstance(depth, bool) or not isinstance(depth, int) or (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (e.g. 28, 34), got {depth!r}")
        if isinstance(widen, bool) or not isinstance(widen, int) or widen < 1:
            raise ValueError(f"widen must be a positive int, got {widen!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = make_normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn(out))
        return self.fc(self.flatten(self.pool(out)))


def wrn28_4(num_classes: int = 10, in_channels: int = 3, **kw) -> WideResNet:
    """WideResNet-28-4 (5.8 M parameters, 10 classes).

    ``**kw``: ``mean``, ``std``, ``dropout``, and ``depth`` / ``widen`` to build another WRN in the
    same layout (``{"widen": 10}`` is WRN-28-10).
    """
    return WideResNet(kw.pop("depth", 28), kw.pop("widen", 4), num_classes, in_channels, **kw)


def wrn28_10(num_classes: int = 10, in_channels: int = 3, **kw) -> WideResNet:
    """WideResNet-28-10 in this package's layout (36.5 M parameters). For RobustBench's
    checkpoints use ``robustbench:wrn28_10`` (their key names)."""
    return WideResNet(kw.pop("depth", 28), kw.pop("widen", 10), num_classes, in_channels, **kw)


def wrn34_10(num_classes: int = 10, in_channels: int = 3, **kw) -> WideResNet:
    """WideResNet-34-10 in this package's layout (46.2 M parameters)."""
    return WideResNet(kw.pop("depth", 34), kw.pop("widen", 10), num_classes, in_channels, **kw)
