"""VGG-16 with batch normalisation and a single linear head (the CIFAR variant)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from .common import check_classes, make_normalize

__all__ = ["VGG", "vgg16", "VGG16_CFG"]

VGG16_CFG: tuple[Union[int, str], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                          512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BN: conv3x3-BN-ReLU blocks and max-pools from ``cfg``, then one Linear head.

    APB's checkpoints used three different VGG-16 heads; this package fixes one: the 512 features
    left after the last pool (1x1 for 32x32 inputs) feed a single ``Linear(512, num_classes)``.
    An adaptive average pool before the head makes larger inputs work and is a no-op at 32x32.
    """

    def __init__(self, cfg: Sequence[Union[int, str]] = VGG16_CFG, num_classes: int = 10,
                 in_channels: int = 3, *, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        super().__init__()
        check_classes(num_classes)
        self.normalize = make_normalize(in_channels, mean, std)
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(self.normalize(x))
        return self.classifier(self.flatten(self.pool(out)))


def vgg16(num_classes: int = 10, in_channels: int = 3, **kw) -> VGG:
    """VGG-16-BN for 32x32 inputs (14.7 M parameters, 10 classes). ``**kw``: ``mean``, ``std``."""
    return VGG(VGG16_CFG, num_classes, in_channels, **kw)
