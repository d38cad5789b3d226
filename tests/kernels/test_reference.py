"""XLA reference backend against NumPy int64: int8, packed int4, fused epilogue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.kernels import pack_int4
from hqjax.kernels.reference import int4_matmul_xla, matmul_xla

matmul_xla = jax.jit(matmul_xla)  # one executable per shape instead of one per eager op
int4_matmul_xla = jax.jit(int4_matmul_xla)


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 1000, 3), (64, 77, 33)])
def test_reference_exact(make_operands, make_requant, oracle, shape):
    m, k, n = shape
    a, b, w4 = make_operands(m, k, n)
    np.testing.assert_array_equal(np.asarray(matmul_xla(jnp.asarray(a), jnp.asarray(b))),
                                  oracle.matmul(a, b))
    np.testing.assert_array_equal(np.asarray(int4_matmul_xla(jnp.asarray(a), pack_int4(w4))),
                                  oracle.matmul(a, w4))
    rq = make_requant(n, k, "int8")
    np.testing.assert_array_equal(np.asarray(matmul_xla(jnp.asarray(a), jnp.asarray(b), rq)),
                                  oracle.requant(oracle.matmul(a, b), rq))


def test_reference_accumulates_in_int32_without_overflow():
    k = 4096  # 128*128*4096 = 2^26: far beyond int16, inside int32
    a = jnp.full((2, k), -128, jnp.int8)
    b = jnp.full((k, 3), -128, jnp.int8)
    out = matmul_xla(a, b)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), np.full((2, 3), 128 * 128 * k))
