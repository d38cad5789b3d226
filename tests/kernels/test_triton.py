"""Pallas Triton kernels: exact in interpret mode (poisoned outputs), and they lower for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.kernels import TritonBlocks, pack_int4
from hqjax.kernels.triton import int4_matmul_triton, matmul_triton

BLOCKS = TritonBlocks(block_m=16, block_n=32, block_k=32)
# (M, K, N): a degenerate one, two that are not multiples of any block, one aligned, and a
# random draw (seeded, so failures reproduce)
_r = np.random.default_rng(6)
SHAPES = [(1, 1, 1), (17, 75, 40), (32, 64, 64), tuple(int(x) for x in _r.integers(2, 90, 3))]
POISON = {"int32": 2**31 - 1, "int8": 42, "uint8": 42}  # int32: no |acc| reaches it here


def _poison(m, n, dtype):
    return jnp.full((m, n), POISON[dtype], dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_matmul_exact(make_operands, oracle, shape):
    m, k, n = shape
    a, b, _ = make_operands(m, k, n)
    out = matmul_triton(jnp.asarray(a), jnp.asarray(b), blocks=BLOCKS, interpret=True,
                        out_init=_poison(m, n, "int32"))
    assert out.dtype == jnp.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, b))


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_int4_matmul_exact(make_operands, oracle, shape):
    m, k, n = shape
    a, _, w4 = make_operands(m, k, n)
    out = int4_matmul_triton(jnp.asarray(a), pack_int4(w4), blocks=BLOCKS, interpret=True,
                             out_init=_poison(m, n, "int32"))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, w4))


@pytest.mark.parametrize("shape, out_dtype, int4",
                         [(SHAPES[1], "int8", False), (SHAPES[3], "uint8", True)])
def test_fused_epilogue_exact(make_operands, make_requant, oracle, shape, out_dtype, int4):
    m, k, n = shape
    a, b, w4 = make_operands(m, k, n)
    # the uint8 case also has a zero point and a narrower clip (7-bit unsigned)
    rq = make_requant(n, k, out_dtype, zero_point=out_dtype == "uint8",
                      clip=(0, 127) if out_dtype == "uint8" else None)
    fn, w = (int4_matmul_triton, pack_int4(w4)) if int4 else (matmul_triton, jnp.asarray(b))
    out = fn(jnp.asarray(a), w, rq, blocks=BLOCKS, interpret=True,
             out_init=_poison(m, n, out_dtype))
    want = oracle.requant(oracle.matmul(a, w4 if int4 else b), rq)
    assert out.dtype == jnp.dtype(out_dtype)
    assert (want != POISON[out_dtype]).mean() > 0.9  # the poison is visible where unwritten
    assert 0 < ((want > want.min()) & (want < want.max())).mean() < 1
    np.testing.assert_array_equal(np.asarray(out).astype(np.int64), want)


@pytest.mark.parametrize("variant", ["int8", "int4", "int8_requant", "int4_requant"])
def test_lowers_for_cuda(make_requant, variant):
    m, k, n = 50, 300, 200
    rq = make_requant(n, k, "uint8") if variant.endswith("requant") else None
    int4 = variant.startswith("int4")
    fn = int4_matmul_triton if int4 else matmul_triton
    b = jax.ShapeDtypeStruct(((k + 1) // 2 if int4 else k, n), jnp.int8)
    lowered = jax.jit(lambda x, y: fn(x, y, rq)).trace(
        jax.ShapeDtypeStruct((m, k), jnp.int8), b).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()


def test_blocks_are_validated():
    with pytest.raises(ValueError, match="block_k=48"):
        TritonBlocks(block_k=48).check()


def test_grouped_order_with_a_partial_last_group_covers_every_tile(make_operands, oracle):
    a, b, _ = make_operands(40, 50, 70)  # 3 x 5 tiles, groups of 2 rows: the last is partial
    out = matmul_triton(jnp.asarray(a), jnp.asarray(b), interpret=True,
                        blocks=TritonBlocks(16, 16, 32, group_m=2),
                        out_init=_poison(40, 70, "int32"))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, b))


def test_default_blocks_small_m_config_exact(make_operands, oracle):
    """M <= 64 with default blocks switches to the memory-bound tiles; still exact."""
    a, _, w4 = make_operands(3, 700, 130)
    out = int4_matmul_triton(jnp.asarray(a), pack_int4(w4), interpret=True,
                             out_init=_poison(3, 130, "int32"))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, w4))
