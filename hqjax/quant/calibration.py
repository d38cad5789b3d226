"""Activation range calibrators: running min/max, EMA, percentile and MSE-optimal clipping.

A calibrator is a pair of pure functions in the style of optax's ``GradientTransformation``:
``init() -> state`` and ``update(state, x, spec) -> state``, where the state is a dict
``{'min', 'max', 'count'}`` of arrays (it lives in the ``'quant_stats'`` Flax collection, so
calibration is explicit state threaded through ``apply``). ``state_range(state)`` gives the
``(min, max)`` a frozen quantizer uses.

HAWQ-V3 (Yao et al. 2021, Sec. 4) calibrates activation ranges with running statistics
during QAT; percentile clipping (McKinstry et al. 2019) and MSE-optimal clipping
(Banner et al. 2019; Sung et al. 2015) trade clipping error for rounding error at low bits.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from hqjax.quant.quantizers import QuantSpec, fake_quant

__all__ = ["Calibrator", "minmax", "ema", "percentile", "mse", "state_range", "get_calibrator"]


class Calibrator(NamedTuple):
    init: Callable[[], dict]
    update: Callable[[dict, jax.Array, QuantSpec], dict]
    name: str = "calibrator"


def _init() -> dict:
    return {"min": jnp.zeros((), jnp.float32), "max": jnp.zeros((), jnp.float32),
            "count": jnp.zeros((), jnp.int32)}


def _batch_minmax(x, spec):
    x = jnp.asarray(x, jnp.float32)
    lo, hi = jnp.min(x), jnp.max(x)
    if spec.mode == "unsigned":
        lo = jnp.zeros_like(lo)
    return lo, hi


def _merge(state, lo, hi, combine):
    first = state["count"] == 0
    new_lo = jnp.where(first, lo, combine(state["min"], lo))
    new_hi = jnp.where(first, hi, combine(state["max"], hi))
    return {"min": new_lo, "max": new_hi, "count": state["count"] + 1}


def minmax() -> Calibrator:
    """Running min and max over every batch seen."""
    def update_minmax(state, x, spec):
        lo, hi = _batch_minmax(x, spec)
        first = state["count"] == 0
        return {"min": jnp.where(first, lo, jnp.minimum(state["min"], lo)),
                "max": jnp.where(first, hi, jnp.maximum(state["max"], hi)),
                "count": state["count"] + 1}

    return Calibrator(_init, update_minmax, "minmax")


def ema(momentum: float = 0.9) -> Calibrator:
    """Exponential moving average of per-batch min and max (momentum = weight of the past)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"ema momentum must be in [0, 1), got {momentum}")
    combine = lambda old, new: momentum * old + (1.0 - momentum) * new
    return Calibrator(_init, lambda s, x, spec: _merge(s, *_batch_minmax(x, spec), combine), "ema")


def percentile(q: float = 99.99, momentum: float = 0.9) -> Calibrator:
    """Per-batch ``(100 - q)``-th and ``q``-th percentiles, averaged over batches by EMA."""
    if not 50.0 < q <= 100.0:
        raise ValueError(f"percentile q must be in (50, 100], got {q}")
    combine = lambda old, new: momentum * old + (1.0 - momentum) * new

    def update(state, x, spec):
        x = jnp.asarray(x, jnp.float32).ravel()
        lo, hi = jnp.percentile(x, 100.0 - q), jnp.percentile(x, q)
        if spec.mode == "unsigned":
            lo = jnp.zeros_like(lo)
        return _merge(state, lo, hi, combine)

    return Calibrator(_init, update, "percentile")


def mse(n_grid: int = 64, momentum: float = 0.9) -> Calibrator:
    """Per-batch clipping range ``α·[min, max]`` minimizing ``||Q(x) - x||^2`` over a grid of
    ``α ∈ (0, 1]`` at the spec's bit width, averaged over batches by EMA."""
    combine = lambda old, new: momentum * old + (1.0 - momentum) * new
    alphas = jnp.linspace(1.0 / n_grid, 1.0, n_grid)

    def update(state, x, spec):
        x = jnp.asarray(x, jnp.float32)
        lo, hi = _batch_minmax(x, spec)
        per_tensor = QuantSpec(bits=spec.bits, mode=spec.mode)
        errs = jax.vmap(lambda a: jnp.sum(jnp.square(fake_quant(x, per_tensor, (a * lo, a * hi)) - x)))(alphas)
        best = alphas[jnp.argmin(errs)]
        return _merge(state, best * lo, best * hi, combine)

    return Calibrator(_init, update, "mse")


def state_range(state: dict) -> tuple[jax.Array, jax.Array]:
    return state["min"], state["max"]


_REGISTRY = {"minmax": minmax, "ema": ema, "percentile": percentile, "mse": mse}


def get_calibrator(name_or_calibrator) -> Calibrator:
    """A calibrator by name (``'minmax'``, ``'ema'``, ``'percentile'``, ``'mse'``) or as given."""
    if isinstance(name_or_calibrator, Calibrator):
        return name_or_calibrator
    if name_or_calibrator not in _REGISTRY:
        raise ValueError(f"unknown calibrator {name_or_calibrator!r}; use one of {sorted(_REGISTRY)} "
                         f"or a hqjax.quant.Calibrator")
    return _REGISTRY[name_or_calibrator]()
