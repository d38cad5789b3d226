"""hqjax.kernels.cpu.conv_weight_grad: the native weight gradient equals lax's, under every transform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import hqjax
from hqjax.kernels.cpu import _library, accelerate, conv_primitives, conv_weight_grad, gram_schmidt
from hqjax.kernels.cpu.conv_weight_grad import conv2d_weight_grad, reference_weight_grad
from hqjax.kernels.cpu.rewrite import Rewrites, rewrite


def cpu_convolutions(fn, *, onednn=True, native_wgrad=False, native_forward=False, native_matmul=False,
                     min_native_width=0):
    """The rewrite with the given kernels on (the width gate off unless asked: the kernels are tested on any shape)."""
    return rewrite(fn, Rewrites(onednn, native_wgrad, native_forward, native_matmul, min_native_width))

CASES = [  # x shape (NHWC), kernel (KH, KW), strides, padding, CO
    ((4, 9, 9, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), 5),
    ((2, 11, 10, 16), (3, 3), (2, 2), ((1, 1), (1, 1)), 32),   # stride 2, odd size
    ((1, 8, 8, 17), (1, 1), (2, 2), ((0, 0), (0, 0)), 24),     # 1x1 projection, batch 1
    ((3, 7, 12, 6), (3, 2), (2, 1), ((2, 0), (0, 1)), 9),      # asymmetric padding and strides
    ((2, 6, 6, 13), (5, 5), (1, 1), ((2, 2), (2, 2)), 7),      # 5x5, channels not multiples of 8
    ((2, 10, 10, 4), (3, 3), (3, 3), ((0, 2), (1, 1)), 40),    # stride 3, three co blocks
    ((1, 5, 4, 1), (2, 3), (1, 1), ((0, 0), (0, 0)), 1),       # single channel, no padding
]


def _lax_weight_grad(x, dy, kernel, strides, padding):
    w = jnp.zeros((*kernel, x.shape[3], dy.shape[3]), x.dtype)
    conv = lambda w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, w)[1](dy)[0]


def _operands(case, seed=0):
    x_shape, kernel, strides, padding, co = case
    out = [(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(x_shape[1:3], kernel, strides, padding)]
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal(x_shape), jnp.float32),
            jnp.asarray(r.standard_normal((x_shape[0], *out, co)), jnp.float32))


def _params(case):
    return dict(kernel_size=case[1], window_strides=case[2], padding=case[3])




@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("case", CASES)
def test_native_weight_grad_equals_lax(case, assert_close):
    x, dy = _operands(case)
    want = _lax_weight_grad(x, dy, *case[1:4])
    assert_close(jax.jit(functools.partial(reference_weight_grad, **_params(case)))(x, dy), want)
    f = jax.jit(functools.partial(conv2d_weight_grad, **_params(case)))
    assert "hqjax_conv2d_weight_grad_f32" in f.lower(x, dy).as_text()
    assert_close(f(x, dy), want)


@pytest.mark.usefixtures("native")
def test_portable_micro_kernel_equals_lax(scalar_isa, assert_close):
    for case in CASES[:5]:
        x, dy = _operands(case)
        assert_close(jax.jit(functools.partial(conv2d_weight_grad, **_params(case)))(x, dy),
               _lax_weight_grad(x, dy, *case[1:4]))


@pytest.mark.usefixtures("native")
def test_results_do_not_depend_on_scheduling():
    case = CASES[1]
    x, dy = _operands(case)
    f = jax.jit(functools.partial(conv2d_weight_grad, **_params(case)))
    first = np.asarray(f(x, dy))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, dy)), first)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_jvp_vjp_vmap_of_native_weight_grad(case, assert_close):
    p = _params(case)
    nat, ref = functools.partial(conv2d_weight_grad, **p), functools.partial(reference_weight_grad, **p)
    (x, dy), (dx, ddy) = _operands(case), _operands(case, seed=1)
    t_want = jax.jvp(ref, (x, dy), (dx, ddy))[1]
    assert_close(jax.jit(lambda *a: jax.jvp(nat, a[:2], a[2:])[1])(x, dy, dx, ddy), t_want)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(t_want.shape), jnp.float32)
    for w, g in zip(jax.vjp(ref, x, dy)[1](ct), jax.jit(lambda x, dy: jax.vjp(nat, x, dy)[1](ct))(x, dy)):
        assert_close(g, w)
    y, lin = jax.linearize(nat, x, dy)  # linearize keeps the tangent maps native
    assert_close(lin(dx, ddy), t_want)
    assert "conv2d_weight_grad" in str(jax.make_jaxpr(lin)(dx, ddy))
    xs, dys = jnp.stack([x, dx]), jnp.stack([dy, ddy])
    for axes, args in [((0, 0), (xs, dys)), ((0, None), (xs, dy)), ((None, 0), (x, dys))]:
        assert_close(jax.jit(jax.vmap(nat, axes))(*args), jax.vmap(ref, axes)(*args))


FORWARD = [  # forward convolutions whose weight gradients the rewrite must recognize
    ((2, 9, 9, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    ((2, 3, 12, 10), (6, 3, 3, 3), (2, 2), ((1, 0), (2, 1)), ("NCHW", "OIHW", "NCHW")),
    ((3, 10, 10, 5), (1, 1, 5, 4), (2, 2), ((0, 0), (0, 0)), ("NHWC", "HWIO", "NHWC")),
]


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("case", FORWARD)
def test_rewrite_runs_weight_gradients_natively(case, assert_close):
    lhs_shape, rhs_shape, strides, padding, dn = case
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal(lhs_shape), jnp.float32)
    w = jnp.asarray(r.standard_normal(rhs_shape), jnp.float32)
    conv = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
    loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
    grads = jax.grad(loss, argnums=(0, 1))
    rewritten = cpu_convolutions(grads, native_wgrad=True)
    prims = {e.primitive.name for e in jax.make_jaxpr(rewritten)(x, w).jaxpr.eqns}
    assert "conv2d_weight_grad" in prims
    for got, want in zip(jax.jit(rewritten)(x, w), grads(x, w)):
        assert_close(got, want)
    # reverse mode through a rewritten forward pass: the oneDNN convolution's weight transpose
    fwd = cpu_convolutions(loss, native_wgrad=True)
    vjp_prims = str(jax.make_jaxpr(jax.grad(fwd, argnums=1))(x, w))
    assert "conv2d_weight_grad" in vjp_prims
    assert_close(jax.jit(jax.grad(fwd, argnums=1))(x, w), grads(x, w)[1])



@pytest.mark.usefixtures("native")
@pytest.mark.slow
def test_resnet_gradient_matches_xla(resnet_loss):
    """(test_rewrite's ResNet test covers its HVPs with accelerate's 'auto', i.e. native.)"""
    loss, params = resnet_loss()
    scale = lambda t: float(hqjax.tree.tree_norm(t))
    grad = accelerate(jax.grad(loss))
    assert "conv2d_weight_grad" in {e.primitive.name for e in jax.make_jaxpr(grad)(params).jaxpr.eqns}
    want = jax.jit(jax.grad(loss))(params)
    assert scale(jax.tree.map(jnp.subtract, jax.jit(grad)(params), want)) <= 1e-5 * scale(want)


def test_fallback_without_a_compiler(no_compiler, caplog, assert_close):
    ok, reason = conv_weight_grad.native_wgrad_status()
    assert not ok and "no-such-c++" in reason
    assert _library.library() is None
    assert sum("native kernels are unavailable" in r.getMessage() for r in caplog.records) == 1  # warned once
    # the primitive itself still works: it lowers to XLA's convolution
    case = CASES[1]
    x, dy = _operands(case)
    f = jax.jit(functools.partial(conv2d_weight_grad, **_params(case)))
    assert "hqjax_conv2d_weight_grad_f32" not in f.lower(x, dy).as_text()
    assert_close(f(x, dy), _lax_weight_grad(x, dy, *case[1:4]))
    lhs_shape, rhs_shape, strides, padding, dn = FORWARD[1]
    r = np.random.default_rng(0)
    x, w = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in (lhs_shape, rhs_shape))
    loss = lambda w: jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)))
    v = jnp.asarray(r.standard_normal(rhs_shape), jnp.float32)
    assert_close(accelerate(lambda w: hqjax.hvp(loss, w, v))(w), hqjax.hvp(loss, w, v), rtol=1e-4)
    with pytest.raises(RuntimeError, match="mode='native' is unavailable"):
        accelerate(lambda w: hqjax.hvp(loss, w, v), mode="native")(w)


def test_failed_build_is_remembered_on_disk(no_compiler, monkeypatch, tmp_path):
    """A broken compiler costs one compile: the failure is recorded in the cache directory,
    and a later process (fresh caches) reports it without compiling again."""
    calls = tmp_path / "calls"
    fake = tmp_path / "broken-c++"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho x >> {calls}\n"
                    "echo 'error: broken' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    ok, reason = conv_weight_grad.native_wgrad_status()
    assert not ok and "failed (3)" in reason and "broken" in reason
    assert not list(no_compiler.glob("*.so"))  # no partial library left in the cache
    assert len(list(no_compiler.glob("*.failed"))) == 1
    monkeypatch.setattr(_library, "register", functools.lru_cache(maxsize=1)(_library.register.__wrapped__))
    ok, reason = _library.register()
    assert not ok and "an earlier build with this compiler failed" in reason and "broken" in reason
    assert calls.read_text().count("x") == 1  # compiled once, not once per process


@pytest.mark.usefixtures("native", "onednn")
def test_status_checks_asked_first_inside_jit_still_pass(monkeypatch):
    """The self-checks run their cases eagerly: asked while a function is being traced, they
    must not fail on (and cache a failure from) tracers."""
    fresh = {"wgrad": functools.lru_cache(maxsize=1)(conv_weight_grad.native_wgrad_status.__wrapped__),
             "gram_schmidt": functools.lru_cache(maxsize=1)(gram_schmidt.native_gram_schmidt_status.__wrapped__),
             "onednn": functools.lru_cache(maxsize=1)(conv_primitives.onednn_status.__wrapped__)}
    seen = {}

    @jax.jit
    def f(x):
        seen.update({name: status() for name, status in fresh.items()})
        return x

    f(1.0)
    # the fixtures saw every check pass outside jit; inside, each must pass too
    assert seen == {name: (True, "ok") for name in fresh}
