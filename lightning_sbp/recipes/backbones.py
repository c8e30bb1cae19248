"""Image classification networks, each ending in a single ``nn.Linear`` classifier.

Gradient-matching selectors read the inputs of the final linear layer, so every network here
registers its classifier (``fc``) as its last ``nn.Linear`` module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "MLP",
    "DigitsCNN",
    "ResNet",
    "WideResNet",
    "available_backbones",
    "build_backbone",
    "resnet18",
    "wrn16_8",
    "wrn28_10",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity or 1x1 projection shortcut (post-activation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of basic blocks with the CIFAR stem: a 3x3 stride-1 convolution and no max-pool.

    Suited to 32x32 inputs (CIFAR, SVHN, ImageNet-32); spatial size halves at stages 2, 3 and 4.

    Args:
        blocks: number of blocks in each of the four stages (``(2, 2, 2, 2)`` is ResNet-18).
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        width: channels of the first stage; later stages double it.
    """

    def __init__(
        self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, width: int = 64
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, C, H, W]``."""
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class _WideBlock(nn.Module):
    """A pre-activation wide block: BN-ReLU-conv3x3, optional dropout, BN-ReLU-conv3x3."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        # The projection shortcut takes the pre-activated input, as in the wide ResNet paper.
        shortcut = x if self.projection is None else self.projection(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(pre)))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko and Komodakis, 2016) for 32x32 inputs.

    Args:
        depth: total depth, ``6 n + 4`` for ``n`` blocks per stage (16, 22, 28, 40, ...).
        widen_factor: channel multiplier of the three stages (16, 32, 64 times it).
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        dropout: dropout probability between the two convolutions of each block.

    Raises:
        ValueError: if ``depth`` is not of the form ``6 n + 4``.
    """

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wide ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = _conv3x3(in_channels, 16)
        blocks: list[nn.Module] = []
        channels = 16
        for stage, out_channels in enumerate(widths):
            for block in range(per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(_WideBlock(channels, out_channels, stride, dropout))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, C, H, W]``."""
        out = self.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


class DigitsCNN(nn.Module):
    """A small convolutional network for tiny grey images such as the 8x8 digits.

    Two 3x3 convolutions with BatchNorm, a 2x2 max-pool, a third convolution, global average
    pooling and a linear classifier: about 60k parameters, a few milliseconds per batch on a CPU.

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        width: channels of the first convolution; the others use twice as many.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv3x3(in_channels, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv3x3(width, 2 * width),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            _conv3x3(2 * width, 2 * width),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, C, H, W]``."""
        return self.fc(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs, without BatchNorm.

    Args:
        num_classes: outputs of the classifier.
        in_features: size of a flattened input (64 for 8x8 grey digits).
        hidden: sizes of the hidden layers.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: tuple[int, ...] = (128,)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for width in hidden:
            layers += [nn.Linear(size, width), nn.ReLU(inplace=True)]
            size = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of inputs ``[N, ...]`` with ``in_features`` values each."""
        return self.fc(self.features(x))


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 with the CIFAR stem (11M parameters)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


def wrn16_8(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-16-8 (11M parameters), the wide ResNet usually trained on SVHN."""
    return WideResNet(16, 8, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def wrn28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 (36M parameters), the wide ResNet usually trained on CIFAR."""
    return WideResNet(28, 10, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def _digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> DigitsCNN:
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, width=width)


def _mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> MLP:
    return MLP(num_classes=num_classes, in_features=in_channels * image_size * image_size)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "wrn16_8": wrn16_8,
    "wrn28_10": wrn28_10,
    "digits_cnn": _digits_cnn,
    "mlp": _mlp,
}
"""Backbone factories by name; each takes ``num_classes`` and ``in_channels`` keywords."""


def available_backbones() -> list[str]:
    """The names :func:`build_backbone` accepts, sorted."""
    return sorted(BACKBONES)


def build_backbone(name: str, num_classes: int, in_channels: int = 3, **kwargs: object) -> nn.Module:
    """A new network by name.

    Args:
        name: one of :func:`available_backbones`.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        **kwargs: extra arguments of the factory (``dropout`` for wide ResNets, ``image_size`` for ``mlp``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; available backbones: {', '.join(available_backbones())}"
        ) from None
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
