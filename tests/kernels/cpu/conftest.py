"""Fixtures of the CPU backend's tests.

Tests that need a native kernel or jaxlib's oneDNN ask for the ``native`` or ``onednn``
fixture, which skips them when the self-check fails here. The check (and with it the C++
build) runs when the first such test runs, never while tests are collected.
"""

import functools

import pytest


@pytest.fixture(scope="session")
def native():
    """Skip unless every native kernel builds here and passes its self-check."""
    from hqjax.kernels.cpu.conv_forward import native_forward_status
    from hqjax.kernels.cpu.conv_weight_grad import native_wgrad_status
    from hqjax.kernels.cpu.gram_schmidt import native_gram_schmidt_status
    from hqjax.kernels.cpu.matmul import native_matmul_status

    for status in (native_wgrad_status, native_forward_status, native_gram_schmidt_status, native_matmul_status):
        ok, reason = status()
        if not ok:
            pytest.skip(f"native kernel unavailable: {reason}")


@pytest.fixture(scope="session")
def onednn():
    """Skip unless jaxlib's oneDNN convolution runs here and agrees with XLA's."""
    from hqjax.kernels.cpu.conv_primitives import onednn_status

    ok, reason = onednn_status()
    if not ok:
        pytest.skip(f"oneDNN convolution unavailable: {reason}")


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
def scalar_isa(native):
    """Runs the test with the native kernels forced onto their portable (scalar) code path."""
    from hqjax.kernels.cpu._library import library

    lib = library()
    isa = lib.hqjax_wgrad_isa()
    assert lib.hqjax_wgrad_set_isa(0) == 0
    yield
    lib.hqjax_wgrad_set_isa(isa)


_STATUSES = (("conv_weight_grad", "native_wgrad_status"), ("conv_forward", "native_forward_status"),
             ("gram_schmidt", "native_gram_schmidt_status"), ("matmul", "native_matmul_status"))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A process state in which nothing about the native library is known yet: an empty cache
    directory and fresh once-per-process caches (restored, with the real library, afterwards)."""
    import importlib

    from hqjax.kernels.cpu import _library

    monkeypatch.setenv("HQJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_library, "register", functools.lru_cache(maxsize=1)(_library.register.__wrapped__))
    monkeypatch.setattr(_library, "warn_once", functools.lru_cache(maxsize=None)(_library.warn_once.__wrapped__))
    for module, name in _STATUSES:
        mod = importlib.import_module(f"hqjax.kernels.cpu.{module}")
        monkeypatch.setattr(mod, name, functools.lru_cache(maxsize=1)(getattr(mod, name).__wrapped__))
    return tmp_path / "cache"


@pytest.fixture
def no_compiler(monkeypatch, tmp_path, fresh_library):
    """A process in which the native kernels cannot be built: a compiler that does not exist."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    return fresh_library
