"""A small convolutional network for 8x8 digits and 28x28 MNIST."""

from __future__ import annotations

import flax.linen as nn


class CNN(nn.Module):
    """``conv1 (3x3) -> relu -> conv2 (3x3, stride 2) -> relu -> dense``.

    Small enough (about 4,000 parameters on 8x8 digits with the defaults) that its full
    Hessian fits in memory, so estimators can be checked against ``jax.hessian`` + ``eigh``.
    """

    channels: tuple[int, int] = (8, 16)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm or dropout
        x = nn.relu(nn.Conv(self.channels[0], (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(self.channels[1], (3, 3), strides=(2, 2), padding="SAME", name="conv2")(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="dense")(x)
