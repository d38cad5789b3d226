"""The native forward convolution (hqjax.kernels.cpu.conv_forward, conv_primitives.native_conv_p)
equals lax's, under every transform, and its absence falls back to oneDNN/XLA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hqjax.kernels.cpu import accelerate, conv_forward, conv_primitives
from hqjax.kernels.cpu.conv_forward import forward_ffi_call
from hqjax.kernels.cpu.rewrite import Rewrites, rewrite


def cpu_convolutions(fn, *, native_forward=False, native_wgrad=False, min_native_width=0):
    """The rewrite with oneDNN where it runs; the width gate off unless asked (the kernel is tested on any shape)."""
    return rewrite(fn, Rewrites(conv_primitives.onednn_status()[0], native_wgrad, native_forward, False,
                                min_native_width))

CASES = [  # x shape (NHWC), w shape (HWIO), strides, padding
    ((4, 9, 9, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1))),        # first-layer channels
    ((2, 11, 10, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),    # stride 2, odd size
    ((1, 8, 8, 17), (1, 1, 17, 24), (2, 2), ((0, 0), (0, 0))),      # 1x1 projection, batch 1
    ((3, 7, 12, 6), (3, 2, 6, 9), (2, 1), ((2, 0), (0, 1))),        # asymmetric padding and strides
    ((2, 6, 9, 5), (5, 5, 5, 7), (1, 1), ((2, 2), (2, 2))),         # 5x5, channels 5 and 7
    ((2, 10, 10, 4), (3, 3, 4, 40), (3, 3), ((0, 2), (1, 1))),      # stride 3, 40 = 16 + 16 + 8
    ((2, 5, 5, 40), (3, 3, 40, 5), (1, 1), ((4, 3), (3, 4))),       # padding larger than the kernel
    ((1, 5, 4, 1), (2, 3, 1, 1), (1, 1), ((0, 0), (0, 0))),         # single channel, no padding
    ((2, 16, 16, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1))),    # ResNet-20 shapes (smaller batch)
    ((1, 8, 13, 64), (7, 7, 64, 20), (1, 2), ((3, 3), (3, 2))),     # 7x7
]


def _operands(case, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal(case[0]), jnp.float32),
            jnp.asarray(r.standard_normal(case[1]), jnp.float32))


def _lax(case):
    return lambda x, w: lax.conv_general_dilated(x, w, case[2], case[3], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                 precision=lax.Precision.HIGHEST)




def _prims(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("case", CASES)
def test_native_forward_equals_lax(case, assert_close):
    x, w = _operands(case)
    want = jax.jit(_lax(case))(x, w)
    assert_close(jax.jit(functools.partial(forward_ffi_call, window_strides=case[2], padding=case[3]))(x, w), want)
    f = cpu_convolutions(_lax(case), native_forward=True)
    assert "native_conv_general_dilated" in _prims(f, x, w)
    assert "hqjax_conv2d_forward_f32" in jax.jit(f).lower(x, w).as_text()
    assert_close(jax.jit(f)(x, w), want)


@pytest.mark.usefixtures("native")
def test_portable_micro_kernel_equals_lax(scalar_isa, assert_close):
    for case in CASES[:7]:
        x, w = _operands(case)
        assert_close(jax.jit(functools.partial(forward_ffi_call, window_strides=case[2], padding=case[3]))(x, w),
               _lax(case)(x, w))


@pytest.mark.usefixtures("native")
def test_other_layouts_are_transposed_to_nhwc(assert_close):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 6, 9, 10)), jnp.float32)  # NCHW
    w = jnp.asarray(r.standard_normal((5, 6, 3, 3)), jnp.float32)   # OIHW
    f = lambda x, w: lax.conv_general_dilated(x, w, (2, 1), ((1, 0), (2, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    g = cpu_convolutions(f, native_forward=True)
    assert "native_conv_general_dilated" in _prims(g, x, w)
    assert_close(jax.jit(g)(x, w), f(x, w))


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("case", [CASES[1], CASES[4]])
def test_jvp_vjp_linearize_vmap_through_native_forward(case, assert_close):
    f = _lax(case)
    g = cpu_convolutions(f, native_forward=True, native_wgrad=True)
    (x, w), (dx, dw) = _operands(case), _operands(case, seed=1)
    t_want = jax.jvp(f, (x, w), (dx, dw))[1]
    assert_close(jax.jit(lambda *a: jax.jvp(g, a[:2], a[2:])[1])(x, w, dx, dw), t_want)
    y, lin = jax.linearize(g, x, w)  # tangents are the native primitive again
    assert_close(lin(dx, dw), t_want)
    assert "native_conv_general_dilated" in _prims(lin, dx, dw)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(t_want.shape), jnp.float32)
    vjp = lambda x, w: jax.vjp(g, x, w)[1](ct)
    text = _prims(vjp, x, w)
    assert "conv2d_weight_grad" in text  # the weight gradient is native
    if case[2] == (1, 1):  # a stride-1 input gradient is a forward convolution: native again
        assert text.count("native_conv_general_dilated") == 2
    for got, want in zip(jax.jit(vjp)(x, w), jax.vjp(f, x, w)[1](ct)):
        assert_close(got, want)
    xs = jnp.stack([x, dx])
    assert_close(jax.jit(jax.vmap(g, (0, None)))(xs, w), jax.vmap(f, (0, None))(xs, w))
    assert_close(jax.jit(jax.vmap(g, (0, 0)))(xs, jnp.stack([w, dw])), jax.vmap(f, (0, 0))(xs, jnp.stack([w, dw])))


@pytest.mark.usefixtures("native")
def test_results_do_not_depend_on_scheduling():
    x, w = _operands(CASES[8])
    f = jax.jit(functools.partial(forward_ffi_call, window_strides=(1, 1), padding=((1, 1), (1, 1))))
    first = np.asarray(f(x, w))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, w)), first)



@pytest.mark.usefixtures("native")
def test_narrow_outputs_stay_with_onednn():
    r = np.random.default_rng(0)
    f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for width, native in [(8, False), (16, True)]:
        x = jnp.asarray(r.standard_normal((1, 8, width, 8)), jnp.float32)
        w = jnp.asarray(r.standard_normal((3, 3, 8, 8)), jnp.float32)
        assert ("native_conv_general_dilated" in _prims(cpu_convolutions(f, native_forward=True, min_native_width=12), x, w)) == native


@pytest.mark.usefixtures("native")
@pytest.mark.slow
def test_resnet_gradient_uses_native_forward(resnet_loss):
    """Traced only (compiling ResNet-20 is slow): its gradient and HVPs are checked against XLA
    with the same 'auto' (= 'native') rewrite by test_conv_weight_grad's and test_rewrite's ResNet
    tests; linearize through the primitive by test_jvp_vjp_linearize_vmap_through_native_forward."""
    loss, params = resnet_loss(batch=2)
    text = _prims(accelerate(jax.grad(loss), mode="native"), params)  # as shipped: 8x8 layers stay with oneDNN
    assert text.count("native_conv_general_dilated") >= 19 - 6 + 16 - 6  # 32x32 and 16x16 layers
    assert "conv2d_weight_grad" in text
    assert "onednn_conv_general_dilated" in text  # the 8x8 layers


@pytest.mark.usefixtures("native", "onednn")
def test_forward_self_check_failure_falls_back_to_onednn(monkeypatch, assert_close):
    """A failing forward self-check leaves 'native' with oneDNN forward convolutions."""
    monkeypatch.setattr(conv_forward, "native_forward_status", lambda: (False, "disagrees"))
    case = CASES[0]
    x, w = _operands(case)
    f = accelerate(_lax(case), mode="native", min_native_width=0)
    text = _prims(f, x, w)
    assert "native_conv_general_dilated" not in text
    assert "onednn_conv_general_dilated" in text
    assert_close(jax.jit(f)(x, w), _lax(case)(x, w))


def test_fallback_without_a_compiler(no_compiler, assert_close):
    ok, reason = conv_forward.native_forward_status()
    assert not ok and "no-such-c++" in reason
    # the primitive itself still works without the library: it lowers to XLA's convolution
    case = CASES[1]
    x, w = _operands(case)
    f = jax.jit(cpu_convolutions(_lax(case), native_forward=True))
    assert "hqjax_conv2d_forward_f32" not in f.lower(x, w).as_text()
    assert_close(f(x, w), _lax(case)(x, w))
