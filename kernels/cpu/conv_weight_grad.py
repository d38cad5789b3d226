"""Weight gradients of 2-D convolutions on XLA:CPU through a native XLA FFI kernel.

Why this exists: the weight gradient ``dW[kh, kw, ci, co] = sum_{b, oh, ow} x_pad[b, oh*s + kh,
ow*s + kw, ci] * dy[b, oh, ow, co]`` is a convolution whose window is as large as the image.
XLA:CPU handles it poorly, and jaxlib's oneDNN forward convolution (used by
:mod:`.conv_primitives` for small windows) falls back to a reference loop on it. As nine
GEMMs per 3x3 kernel reducing over pixels it is easy to do well: the first kernel of
``native_kernels.cc`` is such a kernel, for float32 NHWC activations and HWIO weights, with
any kernel size, strides and padding (built and loaded by :mod:`._library`).

:data:`conv2d_weight_grad_p` is the primitive: the FFI call on the CPU when the library is
available, XLA's own convolution anywhere else. It is bilinear in ``(x, dy)``, so ``jvp``
and ``linearize`` give weight gradients again; transposes and ``vmap`` use the ``lax``
reference. :func:`weight_grad_form` recognizes weight gradients among a jaxpr's
convolutions; :func:`native_wgrad_status` says whether the kernel builds and agrees with XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax._src.interpreters import ad, batching, mlir
from jax.extend import core as jcore

from . import _library

__all__ = ["conv2d_weight_grad", "conv2d_weight_grad_p", "native_wgrad_status", "reference_weight_grad",
           "weight_grad_form"]


# --------------------------------------------------------------------------------------------
# Reference (XLA) and primitive


def _check_geometry(x_shape, dy_shape, kernel_size, window_strides, padding) -> None:
    for n, o, k, s, (lo, hi) in zip(x_shape[1:3], dy_shape[1:3], kernel_size, window_strides, padding):
        if s < 1 or (n + lo + hi - k) // s + 1 != o:
            raise ValueError(f"dy's spatial shape {dy_shape[1:3]} does not follow from x {x_shape}, kernel "
                             f"{kernel_size}, strides {window_strides} and padding {padding}")
    if x_shape[0] != dy_shape[0]:
        raise ValueError(f"x and dy have different batch sizes: {x_shape} vs {dy_shape}")


def reference_weight_grad(x, dy, *, kernel_size, window_strides, padding):
    """The weight gradient as XLA computes it: ``lax``'s own weight-gradient convolution.

    Parameters
    ----------
    x : ``[B, H, W, CI]`` input of the forward convolution.
    dy : ``[B, OH, OW, CO]`` cotangent of its output.
    kernel_size : ``(KH, KW)``.
    window_strides : forward strides ``(sh, sw)``.
    padding : forward padding ``((lo, hi), (lo, hi))``.

    Returns
    -------
    ``[KH, KW, CI, CO]``: the ``w`` cotangent of ``lax.conv_general_dilated(x, w, strides,
    padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``.
    """
    # x's channels act as the batch and its batch as the features; dy is the (dilated) window.
    # High padding is what makes the output exactly the kernel's size (negative when a
    # stride leaves the last input rows unused).
    pad = [(lo, k + (o - 1) * s - n - lo)
           for n, o, k, s, (lo, _) in zip(x.shape[1:3], dy.shape[1:3], kernel_size, window_strides, padding)]
    dn = lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(2, 3, 0, 1))
    return lax.conv_general_dilated(x, dy, (1, 1), pad, rhs_dilation=tuple(window_strides), dimension_numbers=dn,
                                    precision=lax.Precision.HIGHEST)


conv2d_weight_grad_p = jcore.Primitive("conv2d_weight_grad")
conv2d_weight_grad_p.def_impl(functools.partial(dispatch.apply_primitive, conv2d_weight_grad_p))


def _abstract_eval(x, dy, *, kernel_size, window_strides, padding):
    _check_geometry(x.shape, dy.shape, kernel_size, window_strides, padding)
    return jax.core.ShapedArray((*kernel_size, x.shape[3], dy.shape[3]), jnp.result_type(x.dtype, dy.dtype))


conv2d_weight_grad_p.def_abstract_eval(_abstract_eval)


def _struct(v):
    return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)


# Transposes (second-order reverse mode only) are rare; lax's reference transposes are exact.
def _transpose_x(ct, x, dy, **params):
    return jax.linear_transpose(lambda x_: reference_weight_grad(x_, dy, **params), _struct(x))(ct)[0]


def _transpose_dy(ct, x, dy, **params):
    return jax.linear_transpose(lambda dy_: reference_weight_grad(x, dy_, **params), _struct(dy))(ct)[0]


ad.defbilinear(conv2d_weight_grad_p, _transpose_x, _transpose_dy)


def _batch_rule(args, dims, **params):
    # dW sums over the batch, so a vmapped axis cannot be folded into it: per-map results via
    # the reference (vmap of lax's convolution), correctness before speed.
    return jax.vmap(functools.partial(reference_weight_grad, **params), in_axes=dims)(*args), 0


batching.primitive_batchers[conv2d_weight_grad_p] = _batch_rule

_reference_lowering = mlir.lower_fun(reference_weight_grad, multiple_results=False)
mlir.register_lowering(conv2d_weight_grad_p, _reference_lowering)


def _cpu_lowering(ctx, x, dy, *, kernel_size, window_strides, padding):
    if not _library.register()[0]:  # no library: still correct, through XLA
        return _reference_lowering(ctx, x, dy, kernel_size=kernel_size, window_strides=window_strides,
                                   padding=padding)
    return jax.ffi.ffi_lowering(_library.WEIGHT_GRAD_TARGET)(ctx, x, dy, stride_h=np.int64(window_strides[0]),
                                           stride_w=np.int64(window_strides[1]), pad_h=np.int64(padding[0][0]),
                                           pad_w=np.int64(padding[1][0]))


mlir.register_lowering(conv2d_weight_grad_p, _cpu_lowering, platform="cpu")


def conv2d_weight_grad(x, dy, *, kernel_size, window_strides, padding):
    """:func:`reference_weight_grad`'s value, through :data:`conv2d_weight_grad_p` (native on CPU)."""
    return conv2d_weight_grad_p.bind(x, dy, kernel_size=tuple(int(k) for k in kernel_size),
                                     window_strides=tuple(int(s) for s in window_strides),
                                     padding=tuple((int(lo), int(hi)) for lo, hi in padding))


# --------------------------------------------------------------------------------------------
# Recognizing weight gradients among convolutions


def weight_grad_form(lhs_aval, rhs_aval, out_aval, params: dict):
    """A function computing this ``conv_general_dilated`` with the native kernel, or None.

    Any 2-D float32 convolution with unit window strides, no input dilation and no groups is
    a weight gradient: its lhs batch dimension plays the input channels, its lhs features the
    batch, its rhs (dilated by the forward strides) is ``dy`` and its output is ``dW``. Only
    those whose window is larger than their output are taken (that is how weight gradients
    look; small windows are cheaper as ordinary convolutions), with non-negative low padding.

    Returns
    -------
    ``None`` or ``f(lhs, rhs) -> out`` (the same array as the convolution, up to rounding).
    """
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    if len(lhs_spec) != 4:
        return None
    f32 = all(a.dtype == jnp.float32 for a in (lhs_aval, rhs_aval, out_aval))
    if not (f32 and params.get("preferred_element_type") in (None, jnp.float32)
            and tuple(params["window_strides"]) == (1, 1) and tuple(params["lhs_dilation"]) == (1, 1)
            and params["feature_group_count"] == 1 and params["batch_group_count"] == 1
            and all(lo >= 0 for lo, _ in params["padding"])):
        return None
    window = [rhs_aval.shape[d] for d in rhs_spec[2:]]
    kernel = [out_aval.shape[d] for d in out_spec[2:]]
    if np.prod(window) <= np.prod(kernel):
        return None
    strides = tuple(int(s) for s in params["rhs_dilation"])
    x_perm = (lhs_spec[1], *lhs_spec[2:], lhs_spec[0])   # [B, H, W, CI]
    dy_perm = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])  # [B, OH, OW, CO]
    # the convolution's high padding makes its output the kernel's size, so as forward
    # padding it yields exactly dy's size (see reference_weight_grad)
    padding = tuple((int(lo), int(hi)) for lo, hi in params["padding"])
    back = [0] * 4  # dW is [KH, KW, CI, CO]; out_spec names (batch=CI, feature=CO, spatial...)
    back[out_spec[0]], back[out_spec[1]], back[out_spec[2]], back[out_spec[3]] = 2, 3, 0, 1
    perm = lambda a, p: a if tuple(p) == tuple(range(a.ndim)) else jnp.transpose(a, p)

    def f(lhs, rhs):
        dw = conv2d_weight_grad(perm(lhs, x_perm), perm(rhs, dy_perm), kernel_size=kernel,
                                window_strides=strides, padding=padding)
        return perm(dw, back)

    return f


_PROBES = (  # (x shape, kernel size, strides, padding, co)
    ((2, 7, 6, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), 4),
    ((1, 9, 8, 5), (3, 3), (2, 2), ((1, 1), (1, 1)), 17),     # stride 2, batch 1, a masked co tail
    ((3, 6, 7, 8), (1, 1), (2, 2), ((0, 0), (0, 0)), 9),      # 1x1 projection
    ((2, 10, 9, 7), (3, 2), (2, 1), ((2, 0), (0, 1)), 20),    # asymmetric everything
)


def _wgrad_cases(draw):
    for x_shape, kernel, strides, padding, co in _PROBES:
        dy_shape = (x_shape[0], *[(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
                                  in zip(x_shape[1:3], kernel, strides, padding)], co)
        x, dy = draw(x_shape), draw(dy_shape)
        p = dict(kernel_size=kernel, window_strides=strides, padding=padding)
        yield (jax.jit(functools.partial(conv2d_weight_grad, **p))(x, dy),
               jax.jit(functools.partial(reference_weight_grad, **p))(x, dy), f"{x_shape}, {p}")


@functools.lru_cache(maxsize=1)
def native_wgrad_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the native weight gradient builds, loads and agrees with XLA.

    Done once per process: compile (or find in the cache) and register the kernel, then
    compare it with :func:`reference_weight_grad` on cases with strides, asymmetric padding,
    1x1 kernels, batch 1 and channel counts that are not multiples of 8.
    """
    return _library.self_check("weight-gradient kernel", _wgrad_cases)
