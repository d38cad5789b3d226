"""XLA reference backend: ``lax.dot_general`` with int32 accumulation, epilogue in ``jnp``.

This is the ground truth every Pallas backend must equal bit for bit, and the fastest path
on the CPU (where Pallas only runs in interpret mode). All functions take 2-D operands;
:mod:`.dispatch` flattens or vmaps leading dimensions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .packing import unpack_int4
from .requant import Requant, apply_requant

__all__ = ["matmul_xla", "int4_matmul_xla"]


def _dot_i32(a, b):
    return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.int32)


def matmul_xla(a, b, rq: Requant | None = None):
    """``a (M, K) int8 @ b (K, N) int8 -> int32``, or requantized by ``rq``."""
    return apply_requant(_dot_i32(a, b), rq)


def int4_matmul_xla(a, packed, rq: Requant | None = None):
    """``a (M, K) int8 @ unpack_int4(packed) (K, N) -> int32``, or requantized by ``rq``.

    XLA:CPU rejects ``jnp.int4`` dot operands, so the weights are unpacked to int8 first.
    """
    return apply_requant(_dot_i32(a, unpack_int4(packed, a.shape[-1])), rq)
