"""Dyadic arithmetic for integer-only requantization (HAWQ-V3, Yao et al. 2021, Sec. 3.2).

A real multiplier ``M = S_w S_x / S_y`` is replaced by a dyadic number ``m / 2^k`` (``m`` a
31-bit integer mantissa from ``frexp``), so requantizing an int32 accumulator ``a`` is
``round(a m / 2^k)``: an integer multiply and a rounding right shift, no float operation.
JAX runs without 64-bit integers by default, so the 62-bit product ``a m`` is formed from
16-bit limbs in uint32 arithmetic (as gemmlowp's ``SaturatingRoundingDoublingHighMul`` does
in hardware), then rounded half away from zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dyadic", "dyadic_requantize", "MANTISSA_BITS"]

MANTISSA_BITS = 31


def dyadic(multiplier, mantissa_bits: int = MANTISSA_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: ``(m, k)`` int32 arrays with ``m / 2^k ≈ multiplier`` and ``m < 2^mantissa_bits``.

    ``frexp`` gives ``multiplier = f 2^e`` with ``f ∈ [0.5, 1)``; then ``m = round(f 2^31)``
    and ``k = 31 - e`` (relative error at most ``2^-31``).

    Raises
    ------
    ValueError : for non-positive or non-finite multipliers, or ones that need a negative
        or over-62-bit shift.
    """
    mult = np.asarray(multiplier, np.float64)
    if not np.all(np.isfinite(mult)) or np.any(mult <= 0):
        raise ValueError(f"dyadic multipliers must be finite and positive, got {mult.ravel()[:5]}")
    f, e = np.frexp(mult)
    m = np.round(f * 2.0**mantissa_bits).astype(np.int64)
    k = mantissa_bits - e.astype(np.int64)
    carry = m >= 2**mantissa_bits  # f rounded up to 1.0
    m = np.where(carry, m // 2, m)
    k = np.where(carry, k - 1, k)
    if np.any(k < 1) or np.any(k > 62):
        raise ValueError(f"multiplier range {mult.min():.3g}..{mult.max():.3g} needs shifts {k.min()}..{k.max()}; "
                         f"dyadic requantization supports shifts 1..62 (multipliers ~2^-31..2^30)")
    return m.astype(np.int32), k.astype(np.int32)


def _wide_mul(a, b):
    """uint32 × uint32 -> (hi, lo) uint32 words of the 64-bit product."""
    mask = jnp.uint32(0xFFFF)
    a_lo, a_hi = a & mask, a >> 16
    b_lo, b_hi = b & mask, b >> 16
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & mask) + (hl & mask)
    lo = (ll & mask) | (mid << 16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi, lo


def dyadic_requantize(acc: jax.Array, m: jax.Array, shift: jax.Array) -> jax.Array:
    """``round(acc · m / 2^shift)`` in int32, rounding half away from zero, integers only.

    Parameters
    ----------
    acc : int32 accumulator (``|acc| < 2^31``).
    m, shift : int32 dyadic multiplier from :func:`dyadic`, broadcastable to ``acc``
        (per output channel on the last axis).
    """
    acc = jnp.asarray(acc, jnp.int32)
    m = jnp.asarray(m, jnp.int32).astype(jnp.uint32)
    k = jnp.asarray(shift, jnp.int32).astype(jnp.uint32)
    neg = acc < 0
    mag = jnp.where(neg, -acc, acc).astype(jnp.uint32)
    hi, lo = _wide_mul(mag, m)
    # add 2^(k-1): the rounding bit lands in the low word when k <= 32, in the high one otherwise
    one = jnp.uint32(1)
    in_lo = k <= 32
    r_lo = jnp.where(in_lo, one << jnp.minimum(k - 1, 31), jnp.uint32(0))
    r_hi = jnp.where(in_lo, jnp.uint32(0), one << jnp.clip(k - 33, 0, 31))
    lo2 = lo + r_lo
    hi = hi + r_hi + (lo2 < lo).astype(jnp.uint32)
    # shift the 64-bit (hi, lo) right by k, 1 <= k <= 62
    small = k < 32
    ks = jnp.minimum(k, 31)
    from_small = (lo2 >> ks) | (hi << (jnp.uint32(32) - jnp.maximum(ks, 1)))
    from_big = hi >> jnp.clip(k - 32, 0, 31)
    out = jnp.where(small, from_small, from_big).astype(jnp.int32)
    return jnp.where(neg, -out, out)
