"""Dyadic arithmetic for integer-only requantization (HAWQ-V3, Yao et al. 2021, Sec. 3.2).

A real multiplier ``M = S_w S_x / S_y`` is replaced by a dyadic number ``m / 2^k`` (``m`` a
31-bit integer mantissa from ``frexp``), so requantizing an int32 accumulator ``a`` is
``round(a m / 2^k)``: an integer multiply and a rounding right shift, no float operation.

The arithmetic lives once, in :mod:`hqjax.kernels.requant` (it is also the body of every
kernel epilogue); these are the names ``hqjax.quant`` has always exported for it.
"""

from __future__ import annotations

import jax
import numpy as np

from hqjax.kernels.requant import dyadic_from_scale, dyadic_round

__all__ = ["dyadic", "dyadic_requantize", "MANTISSA_BITS"]

MANTISSA_BITS = 31


def dyadic(multiplier, mantissa_bits: int = MANTISSA_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: ``(m, k)`` int32 arrays with ``m / 2^k ≈ multiplier`` and ``m < 2^mantissa_bits``.

    ``frexp`` gives ``multiplier = f 2^e`` with ``f ∈ [0.5, 1)``; then ``m = round(f 2^31)``
    and ``k = 31 - e`` (relative error at most ``2^-31``). See
    :func:`hqjax.kernels.requant.dyadic_from_scale`.

    Raises
    ------
    ValueError : for non-positive or non-finite multipliers, or ones that need a shift
        outside 1..62 (multipliers ~2^-31..2^30).
    """
    return dyadic_from_scale(multiplier, mantissa_bits, what="dyadic")


def dyadic_requantize(acc: jax.Array, m: jax.Array, shift: jax.Array) -> jax.Array:
    """``round(acc · m / 2^shift)`` in int32, rounding half away from zero, integers only.

    Parameters
    ----------
    acc : int32 accumulator.
    m, shift : int32 dyadic multiplier from :func:`dyadic`, broadcastable to ``acc``
        (per output channel on the last axis).

    See :func:`hqjax.kernels.requant.dyadic_round` (results outside int32 saturate).
    """
    return dyadic_round(acc, m, shift)
