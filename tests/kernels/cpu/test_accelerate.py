"""hqjax.kernels.cpu.accelerate: the backend's one entry point, its version gate, and which
kernels it asks for."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import hqjax
from hqjax.kernels.cpu import _accelerate as accelerate_module, _library, conv_forward, conv_primitives
from hqjax.kernels.cpu import conv_weight_grad, matmul
from hqjax.kernels.cpu import accelerate


def _conv_loss(w, x):
    return jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))))


def _operands():
    r = np.random.default_rng(0)
    return (jnp.asarray(r.standard_normal((3, 3, 3, 4)), jnp.float32),
            jnp.asarray(r.standard_normal((2, 16, 16, 3)), jnp.float32))


def test_untested_jax_version_returns_the_function_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(accelerate_module, "TESTED_JAX", ("0.0.1",))
    monkeypatch.setattr(_library, "warn_once", __import__("functools").lru_cache(maxsize=None)(
        _library.warn_once.__wrapped__))
    f = jax.grad(_conv_loss)
    with caplog.at_level(logging.WARNING, logger="hqjax"):
        assert accelerate(f) is f
        assert accelerate(f, mode="native") is f
    messages = [r.getMessage() for r in caplog.records if r.name == "hqjax"]
    assert len(messages) == 1 and "0.0.1" in messages[0] and jax.__version__ in messages[0]


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        accelerate(jnp.sin, mode="mkl")


def test_nothing_to_rewrite_compiles_nothing(fresh_library, monkeypatch):
    """A 4x3 dense model's Hessian has no convolution and no product worth a kernel: no
    build, no self-check, the same operator."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # a build would fail, and be logged and recorded
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    loss = lambda p: jnp.sum(jnp.tanh(jnp.ones((2, 4)) @ p["w"] + p["b"]) ** 2)
    v = jax.tree.map(jnp.ones_like, params)
    got = accelerate(hqjax.hessian(loss, params))(v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(hqjax.hvp(loss, params, v))):
        np.testing.assert_array_equal(g, w)
    assert _library.register.cache_info().currsize == 0  # never asked to build
    assert not fresh_library.exists() or not list(fresh_library.iterdir())


def _choose(monkeypatch, kinds, *, wgrad, forward, mm, onednn, mode="auto"):
    monkeypatch.setattr(conv_weight_grad, "native_wgrad_status", lambda: (wgrad, "ok" if wgrad else "no compiler"))
    monkeypatch.setattr(conv_forward, "native_forward_status", lambda: (forward, "ok" if forward else "disagrees"))
    monkeypatch.setattr(matmul, "native_matmul_status", lambda: (mm, "ok" if mm else "disagrees"))
    monkeypatch.setattr(conv_primitives, "onednn_status", lambda: (onednn, "ok" if onednn else "probe failed"))
    return accelerate_module._choose(mode, set(kinds), True, True, 12)


def test_choice_of_kernels_follows_the_self_checks(monkeypatch):
    convs = {"native_wgrad", "native_forward", "onednn"}
    use = _choose(monkeypatch, convs, wgrad=True, forward=True, mm=True, onednn=True)
    assert (use.onednn, use.native_wgrad, use.native_forward, use.native_matmul) == (True, True, True, False)
    use = _choose(monkeypatch, convs | {"native_matmul"}, wgrad=True, forward=False, mm=True, onednn=False)
    assert (use.onednn, use.native_wgrad, use.native_forward, use.native_matmul) == (False, True, False, True)
    use = _choose(monkeypatch, convs, wgrad=False, forward=True, mm=True, onednn=True)
    assert (use.onednn, use.native_wgrad, use.native_forward) == (True, False, False)  # no wgrad: no native forward
    use = _choose(monkeypatch, convs, wgrad=False, forward=False, mm=False, onednn=False)
    assert use == accelerate_module._choose("layouts", convs, True, True, 12)  # explicit layouts only
    with pytest.raises(RuntimeError, match="no compiler"):
        _choose(monkeypatch, convs, wgrad=False, forward=True, mm=True, onednn=True, mode="native")
    with pytest.raises(RuntimeError, match="probe failed.*mode='layouts'"):
        _choose(monkeypatch, convs, wgrad=True, forward=True, mm=True, onednn=False, mode="onednn")


def test_candidates_name_what_the_rewrite_would_take():
    from hqjax.kernels.cpu.rewrite import candidates

    w, x = _operands()
    assert candidates(jax.make_jaxpr(_conv_loss)(w, x).jaxpr) == {"native_forward", "onednn"}
    assert "native_wgrad" in candidates(jax.make_jaxpr(jax.grad(_conv_loss))(w, x).jaxpr)
    assert candidates(jax.make_jaxpr(lambda a: jnp.tanh(a @ a))(jnp.ones((4, 4))).jaxpr) == set()


@pytest.mark.usefixtures("native", "onednn")
def test_accelerated_gradient_equals_xlas(assert_close):
    w, x = _operands()
    g = accelerate(jax.grad(_conv_loss))
    names = {e.primitive.name for e in jax.make_jaxpr(g)(w, x).jaxpr.eqns}
    assert "conv2d_weight_grad" in names and "native_conv_general_dilated" in names
    assert_close(jax.jit(g)(w, x), jax.grad(_conv_loss)(w, x), rtol=1e-4)
