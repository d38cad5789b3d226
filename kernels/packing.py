"""Signed int4 packing: two 4-bit weights per int8 byte, split by halves of the packed axis.

Layout (the contract between :func:`pack_int4`, :func:`unpack_int4` and every int4 kernel):
for a weight ``w`` of length ``K`` along the packed axis (the reduction axis of a matmul
weight ``(K, N)``), let ``h = ceil(K / 2)`` and pad ``w`` with one zero row when ``K`` is
odd. Then, for ``i < h``::

    packed[i] = (w[i] & 0xF) | (w[i + h] << 4)        # low nibble: first half of K
                                                       # high nibble: second half of K

Both nibbles are two's complement in [-8, 7]. Splitting by halves (not interleaving
neighbours) lets a kernel unpack a packed tile into two contiguous K-blocks, each multiplied
by a contiguous block of activations: ``a @ w = a[:, :h] @ lo + a[:, h:] @ hi``, with no
in-kernel shuffles. Half the bytes of int8 weights cross memory, which is the point of int4
on hardware without int4 matrix units (e.g. Hopper), as in HAWQ-V3's INT4/INT8 mixed
precision (Yao et al., 2021, Sec. 4).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["pack_int4", "unpack_int4", "unpack_int4_halves"]


def pack_int4(w, axis: int = 0):
    """Pack int values in [-8, 7] two per int8 byte along ``axis`` (layout in module docstring).

    Parameters
    ----------
    w : integer array
        Values in [-8, 7] (checked when concrete).
    axis : int
        The axis to pack, halving its length (rounded up); the reduction axis of a weight.

    Returns
    -------
    int8 array with ``ceil(w.shape[axis] / 2)`` along ``axis``.
    """
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"pack_int4: weights must be integers in [-8, 7], got dtype {w.dtype}")
    try:
        lo, hi = int(np.min(np.asarray(w))), int(np.max(np.asarray(w)))
    except Exception:  # noqa: BLE001 - traced values are the caller's contract
        lo, hi = -8, 7
    if w.size and (lo < -8 or hi > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got range [{lo}, {hi}]; "
                         "quantize to 4 bits first")
    w = jnp.moveaxis(w.astype(jnp.int8), axis, 0)
    k = w.shape[0]
    h = (k + 1) // 2
    w = jnp.pad(w, [(0, 2 * h - k)] + [(0, 0)] * (w.ndim - 1))
    packed = (w[:h] & 0xF) | (w[h:] << 4)
    return jnp.moveaxis(packed.astype(jnp.int8), 0, axis)


def unpack_int4_halves(packed):
    """(low, high) nibbles of int8 ``packed`` as sign-extended int8 (shifts only, kernel-safe)."""
    x = packed.astype(jnp.int32)
    low = lax.shift_right_arithmetic(x << 28, jnp.int32(28))
    high = lax.shift_right_arithmetic(x << 24, jnp.int32(28))
    return low.astype(jnp.int8), high.astype(jnp.int8)


def unpack_int4(packed, size: int | None = None, axis: int = 0):
    """Inverse of :func:`pack_int4`: int8 values in [-8, 7], ``size`` long along ``axis``.

    ``size`` is the original length (default ``2 * packed.shape[axis]``, i.e. an even K).
    """
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.int8:
        raise TypeError(f"unpack_int4: packed weights are int8, got {packed.dtype}")
    p = jnp.moveaxis(packed, axis, 0)
    h = p.shape[0]
    size = 2 * h if size is None else size
    if not (2 * h - 1 <= size <= 2 * h):
        raise ValueError(f"unpack_int4: size={size} does not match {h} packed rows; "
                         f"use {2 * h - 1} or {2 * h}")
    low, high = unpack_int4_halves(p)
    return jnp.moveaxis(jnp.concatenate([low, high], axis=0)[:size], 0, axis)
