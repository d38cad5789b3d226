"""Pallas Triton kernels, features only Triton has: grouped tile order and the small-M tiles.
The tests shared with the Mosaic backend are in test_pallas.py."""

import jax.numpy as jnp
import numpy as np

from hqjax.kernels import TritonBlocks, pack_int4
from hqjax.kernels.triton import int4_matmul_triton, matmul_triton

POISON_INT32 = 2**31 - 1  # no |acc| reaches it here


def _poison(m, n):
    return jnp.full((m, n), POISON_INT32, jnp.int32)


def test_grouped_order_with_a_partial_last_group_covers_every_tile(make_operands, oracle):
    a, b, _ = make_operands(40, 50, 70)  # 3 x 5 tiles, groups of 2 rows: the last is partial
    out = matmul_triton(jnp.asarray(a), jnp.asarray(b), interpret=True,
                        blocks=TritonBlocks(16, 16, 32, group_m=2),
                        out_init=_poison(40, 70))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, b))


def test_default_blocks_small_m_config_exact(make_operands, oracle):
    """M <= 64 with default blocks switches to the memory-bound tiles; still exact."""
    a, _, w4 = make_operands(3, 700, 130)
    out = int4_matmul_triton(jnp.asarray(a), pack_int4(w4), interpret=True,
                             out_init=_poison(3, 130))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, w4))
