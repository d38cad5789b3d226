"""Pallas kernels, Triton (kernels/triton.py) and Mosaic TPU (kernels/mosaic.py): exact in
interpret mode (poisoned outputs), and they lower for their platform. One set of tests,
parametrized over the two backends; Triton-only features are in test_triton.py."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.kernels import MosaicBlocks, TritonBlocks, pack_int4
from hqjax.kernels.mosaic import int4_matmul_mosaic, matmul_mosaic
from hqjax.kernels.triton import int4_matmul_triton, matmul_triton

POISON = {"int32": 2**31 - 1, "int8": 42, "uint8": 42}  # int32: no |acc| reaches it here


class Pallas(NamedTuple):
    matmul: Callable
    int4_matmul: Callable
    blocks: Any
    shapes: list  # (M, K, N): degenerate, two not multiples of any block, aligned, random
    platform: str
    lowered_marker: str
    bad_blocks: Any
    bad_blocks_message: str


def _shapes(seed, mid, aligned, high):
    r = np.random.default_rng(seed)  # seeded, so failures reproduce
    return [(1, 1, 1), mid, aligned, tuple(int(x) for x in r.integers(2, high, 3))]


BACKENDS = {
    "triton": Pallas(matmul_triton, int4_matmul_triton, TritonBlocks(block_m=16, block_n=32, block_k=32),
                     _shapes(6, (17, 75, 40), (32, 64, 64), 90), "cuda", "xla.gpu.triton",
                     TritonBlocks(block_k=48), "block_k=48"),
    "mosaic": Pallas(matmul_mosaic, int4_matmul_mosaic, MosaicBlocks(block_m=32, block_n=128, block_k=128),
                     _shapes(7, (33, 300, 130), (64, 256, 128), 300), "tpu", "tpu_custom_call",
                     MosaicBlocks(block_n=100), "block_n=100"),
}


def _cases(index):
    return [pytest.param(b, BACKENDS[b].shapes[i], id=f"{b}-{'x'.join(map(str, BACKENDS[b].shapes[i]))}")
            for b in BACKENDS for i in index]


def _poison(m, n, dtype):
    return jnp.full((m, n), POISON[dtype], dtype)


@pytest.mark.parametrize("backend, shape", _cases(range(4)))
def test_int8_matmul_exact(make_operands, oracle, backend, shape):
    p, (m, k, n) = BACKENDS[backend], shape
    a, b, _ = make_operands(m, k, n)
    out = p.matmul(jnp.asarray(a), jnp.asarray(b), blocks=p.blocks, interpret=True,
                   out_init=_poison(m, n, "int32"))
    assert out.dtype == jnp.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, b))


@pytest.mark.parametrize("backend, shape", _cases(range(1, 4)))
def test_int4_matmul_exact(make_operands, oracle, backend, shape):
    p, (m, k, n) = BACKENDS[backend], shape
    a, _, w4 = make_operands(m, k, n)
    out = p.int4_matmul(jnp.asarray(a), pack_int4(w4), blocks=p.blocks, interpret=True,
                        out_init=_poison(m, n, "int32"))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, w4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_index, out_dtype, int4", [(1, "int8", False), (3, "uint8", True)])
def test_fused_epilogue_exact(make_operands, make_requant, oracle, backend, shape_index,
                              out_dtype, int4):
    p = BACKENDS[backend]
    m, k, n = p.shapes[shape_index]
    a, b, w4 = make_operands(m, k, n)
    # the uint8 case also has a zero point and a narrower clip (7-bit unsigned)
    rq = make_requant(n, k, out_dtype, zero_point=out_dtype == "uint8",
                      clip=(0, 127) if out_dtype == "uint8" else None)
    fn, w = (p.int4_matmul, pack_int4(w4)) if int4 else (p.matmul, jnp.asarray(b))
    out = fn(jnp.asarray(a), w, rq, blocks=p.blocks, interpret=True,
             out_init=_poison(m, n, out_dtype))
    want = oracle.requant(oracle.matmul(a, w4 if int4 else b), rq)
    assert out.dtype == jnp.dtype(out_dtype)
    assert (want != POISON[out_dtype]).mean() > 0.9  # the poison is visible where unwritten
    assert 0 < ((want > want.min()) & (want < want.max())).mean() < 1
    np.testing.assert_array_equal(np.asarray(out).astype(np.int64), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["int8", "int4", "int8_requant", "int4_requant"])
def test_lowers_for_its_platform(make_requant, backend, variant):
    p = BACKENDS[backend]
    m, k, n = 50, 300, 200
    rq = make_requant(n, k, "uint8") if variant.endswith("requant") else None
    int4 = variant.startswith("int4")
    fn = p.int4_matmul if int4 else p.matmul
    b = jax.ShapeDtypeStruct(((k + 1) // 2 if int4 else k, n), jnp.int8)
    lowered = jax.jit(lambda x, y: fn(x, y, rq)).trace(
        jax.ShapeDtypeStruct((m, k), jnp.int8), b).lower(lowering_platforms=(p.platform,))
    assert p.lowered_marker in lowered.as_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_are_validated(backend):
    p = BACKENDS[backend]
    with pytest.raises(ValueError, match=p.bad_blocks_message):
        p.bad_blocks.check()
