"""Shared helpers for the kernel tests: random int operands and exact NumPy oracles."""

import functools

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


@pytest.fixture(scope="session")
def resnet_loss():
    """``make(batch) -> (loss(params), params)``: ResNet-20 in eval mode on a random batch."""
    import jax
    import optax

    from hqjax.models import ResNet20

    def make(batch=2):
        k = jax.random.split(jax.random.key(0), 3)
        model, x = ResNet20(), jax.random.normal(k[0], (batch, 32, 32, 3))
        y = jax.random.randint(k[1], (batch,), 0, 10)
        variables = model.init(k[2], x, train=False)
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=False), y).mean()
        return loss, variables["params"]

    return make


@pytest.fixture
def scalar_isa():
    """Runs the test with the native kernels forced onto their portable (scalar) code path."""
    from hqjax.kernels import cpu_wgrad

    lib = cpu_wgrad.library()
    isa = lib.hqjax_wgrad_isa()
    assert lib.hqjax_wgrad_set_isa(0) == 0
    yield
    lib.hqjax_wgrad_set_isa(isa)


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A process in which the native kernels cannot be built: a compiler that does not exist."""
    from hqjax.kernels import cpu_conv, cpu_matmul, cpu_wgrad

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("HQJAX_CACHE_DIR", str(tmp_path / "cache"))
    # fresh once-per-process caches, restored (with the real library) when the test ends
    monkeypatch.setattr(cpu_wgrad, "_register", functools.lru_cache(maxsize=1)(cpu_wgrad._register.__wrapped__))
    for name in ("native_wgrad_status", "native_forward_status", "native_gram_schmidt_status"):
        status = functools.lru_cache(maxsize=1)(getattr(cpu_wgrad, name).__wrapped__)
        monkeypatch.setattr(cpu_wgrad, name, status)
        if hasattr(cpu_conv, name):
            monkeypatch.setattr(cpu_conv, name, status)
    status = functools.lru_cache(maxsize=1)(cpu_matmul.native_matmul_status.__wrapped__)
    monkeypatch.setattr(cpu_matmul, "native_matmul_status", status)
    monkeypatch.setattr(cpu_conv, "native_matmul_status", status)
