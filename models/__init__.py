"""Flax models used by hqjax's jobs, tests and benchmarks (imported as ``hqjax.models``).

Every model is called as ``model.apply(variables, x, train=...)``; ``train`` only matters
for models with BatchNorm or dropout, and is always explicit.
"""

from __future__ import annotations

from .bert import BertTiny
from .cnn import CNN
from .mlp import MLP
from .resnet import BasicBlock, CifarResNet, ResNet20, ResNet32, ResNet56

MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "bert_tiny": BertTiny,
}


def get_model(name: str, num_classes: int = 10, **kwargs):
    """Build a registered model by name (``hqjax.models.MODELS`` lists them)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["BertTiny", "MLP", "CNN", "BasicBlock", "CifarResNet", "ResNet20", "ResNet32", "ResNet56", "MODELS", "get_model"]
