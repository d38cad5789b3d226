"""ResNet-20/32/56 for CIFAR-10 (He et al. 2016, Sec. 4.2), with BatchNorm.

Layer paths are ``stem/conv``, ``stage{s}/block{b}/conv{1,2}`` and, with option-B
shortcuts, ``stage{s}/block{b}/shortcut``; the classifier is ``fc``. Train vs eval (batch
statistics vs running averages) is the explicit ``train`` argument of ``__call__``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def _bn(train: bool, name: str):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    ``shortcut='A'`` is the parameter-free shortcut of the paper's CIFAR experiments
    (strided subsampling and zero-padded channels); ``'B'`` is a 1x1 convolution + BN.
    """

    features: int
    strides: int = 1
    shortcut: str = "A"

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, s, n: nn.Conv(f, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), use_bias=False, name=n)
        y = nn.relu(_bn(train, "bn1")(conv(self.features, self.strides, "conv1")(x)))
        y = _bn(train, "bn2")(conv(self.features, 1, "conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                x = x[:, :: self.strides, :: self.strides, :]
                pad = self.features - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
            else:
                x = nn.Conv(self.features, (1, 1), strides=(self.strides, self.strides), use_bias=False, name="shortcut")(x)
                x = _bn(train, "shortcut_bn")(x)
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``6n + 2`` layers (n = 3, 5, 9 for ResNet-20, 32, 56)."""

    depth: int = 20
    num_classes: int = 10
    width: int = 16
    shortcut: str = "A"

    @nn.compact
    def __call__(self, x, train: bool):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {self.depth}")
        n = (self.depth - 2) // 6
        x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem")(x)
        x = nn.relu(_bn(train, "stem_bn")(x))
        for s in range(3):
            for b in range(n):
                strides = 2 if (s > 0 and b == 0) else 1
                x = BasicBlock(self.width * 2**s, strides, self.shortcut, name=f"stage{s + 1}/block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


def ResNet20(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(depth=20, num_classes=num_classes, **kw)


def ResNet32(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(depth=32, num_classes=num_classes, **kw)


def ResNet56(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(depth=56, num_classes=num_classes, **kw)
