"""Shared helpers for the kernel tests: random int operands and exact NumPy oracles."""

import numpy as np
import pytest


def _oracle_requant(acc, mult, shift, bias, zero, out_dtype, clip):
    """int64 HAWQ-V3 requantization: clip(round_half_away((acc+bias)*m/2^s) + zero)."""
    lo, hi = clip or ((-128, 127) if out_dtype == "int8" else (0, 255))
    acc = np.asarray(acc, np.int64)
    n = acc.shape[-1]
    vec = lambda v: np.zeros(n, np.int64) if v is None else np.broadcast_to(  # noqa: E731
        np.asarray(v, np.int64), (n,))
    m, s, b, z = vec(mult), vec(shift), vec(bias), vec(zero)
    x = (acc + b) * m  # |x| < 2^62: exact in int64
    q = np.sign(x) * ((np.abs(x) + (np.int64(1) << (s - 1))) >> s)
    return np.clip(q + z, lo, hi)


class Oracle:
    """Exact NumPy int64 references (independent of every code path under test)."""

    @staticmethod
    def matmul(a, b):
        return np.asarray(a).astype(np.int64) @ np.asarray(b).astype(np.int64)

    @staticmethod
    def requant(acc, rq):
        return _oracle_requant(acc, rq.multiplier, rq.shift, rq.bias, rq.zero_point,
                               rq.out_dtype, rq.clip)


@pytest.fixture(scope="session")
def oracle():
    return Oracle


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture(scope="session")
def make_operands():
    """(a int8 (M, K), b int8 (K, N), w4 int values in [-8, 7] (K, N)) for a shape."""
    def make(m, k, n, seed=0):
        r = np.random.default_rng(seed)
        a = r.integers(-128, 128, (m, k)).astype(np.int8)
        b = r.integers(-128, 128, (k, n)).astype(np.int8)
        w4 = r.integers(-8, 8, (k, n)).astype(np.int8)
        return a, b, w4
    return make


@pytest.fixture(scope="session")
def make_requant():
    """A random per-channel Requant whose outputs land mostly inside the int8/uint8 range."""
    from hqjax.kernels import requant_from_scale

    def make(n, k, out_dtype="int8", seed=0, zero_point=False, clip=None):
        r = np.random.default_rng(seed + 1)
        # accumulators are ~128*128*sqrt(k); scale them to ~100 so clipping and rounding
        # both happen
        scale = r.uniform(0.3, 3.0, n) * 100.0 / (128 * 128 * np.sqrt(k))
        bias = r.integers(-20000, 20000, n)
        zero = r.integers(0, 20, n) if zero_point else None
        return requant_from_scale(scale, bias, zero_point=zero, out_dtype=out_dtype, clip=clip)
    return make
