"""A Linen model in hqjax's calling convention, ``model.apply(variables, x, train=...)``.

hqjax calls every Linen model with an explicit ``train`` flag (train and eval are an explicit
argument everywhere). Models written another way are common: Flax's own ``deterministic``
flag (the negation of ``train``, as in ``nn.Dropout`` and ``nn.MultiHeadDotProductAttention``),
or no mode at all. :func:`with_train_arg` puts such a model behind a module that shares its
scope (``nn.share_scope``), so the wrapper adds no level to any variable path: pretrained
variables, layer names, BitConfigs and Qwix rules are those of the model itself.
"""

from __future__ import annotations

import inspect

import flax.linen as nn

__all__ = ["with_train_arg", "TrainArg"]


def _mode_argument(model: nn.Module) -> str | None:
    """``'train'`` when ``model.__call__`` takes ``train`` (or ``**kwargs``), ``'deterministic'``
    when it takes that instead, ``None`` when it takes neither."""
    params = inspect.signature(type(model).__call__).parameters
    if "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return "train"
    return "deterministic" if "deterministic" in params else None


class TrainArg(nn.Module):
    """``model`` called with hqjax's ``train`` flag: passed as ``deterministic=not train``
    (``mode='deterministic'``) or dropped (``mode=None``: the model has one mode)."""

    model: nn.Module
    mode: str | None = None

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, train: bool = False, **kwargs):
        if self.mode == "deterministic":
            kwargs["deterministic"] = not train
        return self.model(*args, **kwargs)


def with_train_arg(model):
    """``model`` itself when it is not a Linen module or takes ``train``; else a
    :class:`TrainArg` around it with the same variables and layer paths."""
    if not isinstance(model, nn.Module) or isinstance(model, TrainArg):
        return model
    mode = _mode_argument(model)
    return model if mode == "train" else TrainArg(model, mode)
