"""Operand preparation shared by the Pallas backends: padding to whole blocks, epilogue inputs.

Zero rows and columns add nothing to an integer dot product, so padding K is exact, and the
padded M and N edges are sliced off the output. When every dimension is already a multiple
of its block, nothing is copied.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from .requant import out_dtype_of, requant_vectors


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


def epilogue_operands(operands: list, in_specs: list, rq, out_init, n: int, m_padded: int,
                      n_padded: int, row_spec):
    """Append the fused requantization's inputs and the ``out_init`` testing hook.

    ``rq``'s multiplier, shift, bias and zero point become four (1, ``n_padded``) rows read
    with ``row_spec`` (the backend's BlockSpec of one output-column tile). ``out_init``, when
    given, is padded to the output and aliased to it, so tiles the kernel never writes keep
    its value. Extends the two lists in place.

    Returns
    -------
    (out_dtype, input_output_aliases) for ``pl.pallas_call``.
    """
    if rq is not None:
        operands += list(requant_vectors(rq, n, n_padded))
        in_specs += [row_spec] * 4
    out_dtype = out_dtype_of(rq)
    aliases = {}
    if out_init is not None:
        operands.append(pad2(out_init.astype(out_dtype), m_padded, n_padded))
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        aliases = {len(operands) - 1: 0}
    return out_dtype, aliases
