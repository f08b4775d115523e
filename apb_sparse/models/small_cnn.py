"""A small CNN for 8x8 (sklearn digits) and 28x28 (MNIST, Fashion-MNIST) grayscale images."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .common import check_classes, make_normalize

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """Four conv3x3-BN-ReLU layers (widths w, 2w, 4w, 4w; the 2nd and 4th with stride 2), a global
    average pool and one Linear head. About 0.24 M parameters at the default width 32.

    Global pooling makes the same network work on any input size >= 4x4 (8x8 digits: 8->4->2;
    28x28: 28->14->7).

    Args:
        num_classes: output size.
        in_channels: input channels (1 for grayscale).
        width: channels of the first layer.
        mean, std: normalisation statistics (default 0.5 / 0.5 per channel).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, width: int = 32,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        check_classes(num_classes)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.normalize = make_normalize(in_channels, mean, std)
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        strides = [1, 2, 1, 2]
        layers: list[nn.Module] = []
        for c_in, c_out, s in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(chans[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(self.normalize(x)))))


def small_cnn(num_classes: int = 10, in_channels: int = 1, **kw) -> SmallCNN:
    """Small CNN for grayscale 8x8 / 28x28 images. ``**kw``: ``width``, ``mean``, ``std``."""
    return SmallCNN(num_classes, in_channels, **kw)
