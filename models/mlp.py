"""Multi-layer perceptron for flattened images (digits, MNIST)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Fully connected classifier ``Dense_0 … Dense_{n}`` with a configurable activation.

    Attributes
    ----------
    features : hidden widths.
    num_classes : output width.
    activation : ``'relu'`` or ``'tanh'``.
    """

    features: Sequence[int] = (64, 32)
    num_classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm or dropout; the argument keeps one signature for every model
        act = {"relu": nn.relu, "tanh": jnp.tanh}[self.activation]
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)
