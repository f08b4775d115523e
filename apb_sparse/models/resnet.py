"""CIFAR ResNet-18 (He et al. 2016) and PreAct-ResNet-18 (He et al. 2016b).

CIFAR variants: a 3x3 stride-1 stem convolution and no max-pool, so 32x32 inputs keep
resolution until the first strided stage. Projection shortcuts are 1x1 convolutions (plus BN in the
post-activation ResNet).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .common import check_classes, make_normalize

__all__ = ["BasicBlock", "PreActBlock", "ResNet", "PreActResNet", "resnet18", "preact_resnet18"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection (post-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice; the projection shortcut sees the activated input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.has_projection = stride != 1 or in_planes != planes
        if self.has_projection:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        # As in the original pre-activation design, a projection acts on the activated input,
        # an identity shortcut carries the raw input.
        skip = self.shortcut(pre) if self.has_projection else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + skip


class _ResNetBase(nn.Module):
    def __init__(self, block, num_blocks: Sequence[int], num_classes: int, in_channels: int,
                 mean: Optional[Sequence[float]], std: Optional[Sequence[float]], width: int,
                 preact: bool):
        super().__init__()
        check_classes(num_classes)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.normalize = make_normalize(in_channels, mean, std)
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.preact = preact
        if not preact:
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
        stages = []
        for i, n in enumerate(num_blocks):
            planes = width * 2 ** i
            stride = 1 if i == 0 else 2
            layers = []
            for s in [stride] + [1] * (n - 1):
                layers.append(block(self.in_planes, planes, s))
                self.in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if preact:
            self.bn_final = nn.BatchNorm2d(self.in_planes)
            self.relu_final = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(self.in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = self.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = self.relu_final(self.bn_final(out))
        return self.linear(self.flatten(self.pool(out)))


class ResNet(_ResNetBase):
    """CIFAR-style post-activation ResNet (3x3 stem, no max-pool)."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3, *, mean=None, std=None, width: int = 64):
        super().__init__(BasicBlock, num_blocks, num_classes, in_channels, mean, std, width, False)


class PreActResNet(_ResNetBase):
    """CIFAR-style pre-activation ResNet (3x3 stem, no max-pool, BN-ReLU before the head)."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3, *, mean=None, std=None, width: int = 64):
        super().__init__(PreActBlock, num_blocks, num_classes, in_channels, mean, std, width, True)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet18(num_classes: int = 10, in_channels: int = 3, **kw) -> ResNet:
    """CIFAR ResNet-18 (11.2 M parameters at width 64, 10 classes).

    Args:
        num_classes: size of the output layer.
        in_channels: input channels.
        **kw: ``mean``, ``std`` (normalisation statistics), ``width`` (channels of the first stage).
    """
    return ResNet((2, 2, 2, 2), num_classes, in_channels, **kw)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3, **kw) -> PreActResNet:
    """CIFAR PreAct-ResNet-18 (11.2 M parameters at width 64, 10 classes). Arguments as resnet18."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, **kw)
