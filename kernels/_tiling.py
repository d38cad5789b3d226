"""Padding helpers shared by the Pallas backends: operands are zero-padded to whole blocks.

Zero rows and columns add nothing to an integer dot product, so padding K is exact, and the
padded M and N edges are sliced off the output. When every dimension is already a multiple
of its block, nothing is copied.
"""

from __future__ import annotations

import jax.numpy as jnp


def ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def pad2(x, rows: int, cols: int):
    """Zero-pad a 2-D array at its end to (rows, cols); no copy when already that shape."""
    r, c = x.shape
    if (r, c) == (rows, cols):
        return x
    return jnp.pad(x, ((0, rows - r), (0, cols - c)))


def split_k_halves(a, k: int, kh: int, kh_padded: int):
    """Activations for an int4 product: ``[a[:, :kh] | a[:, kh:k]]``, each half padded to
    ``kh_padded`` columns, so block ``j`` of the first half and block ``j`` of the second
    meet packed rows ``j`` (see :mod:`.packing`)."""
    if k == 2 * kh and kh == kh_padded:
        return a
    return jnp.concatenate([pad2(a[:, :kh], a.shape[0], kh_padded),
                            pad2(a[:, kh:], a.shape[0], kh_padded)], axis=1)
