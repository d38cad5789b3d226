"""Convolution primitives for XLA:CPU: jaxlib's oneDNN custom call and hqjax's native forward kernel.

Each primitive has exactly ``lax.conv_general_dilated_p``'s parameters and semantics (shape
rules, batching and the default lowering are lax's own); only its CPU lowering and its
transposes differ:

- :data:`onednn_conv_p` lowers to jaxlib's own oneDNN custom call ``__onednn$convolution``
  (the one XLA's oneDNN rewriter emits; jaxlib carries the runtime but does not enable the
  rewriter). For small windows only: on an image-sized window (a weight gradient) oneDNN's
  forward kernel falls back to a reference loop, hence :data:`MAX_ONEDNN_WINDOW`.
  :data:`onednn_conv_native_wgrad_p` is the same with native weight-gradient transposes.
- :data:`native_conv_p` lowers to the native forward kernel (:mod:`.conv_forward`) for
  2-D NHWC/HWIO convolutions; reverse mode gives native weight gradients and input
  gradients that are rewritten again (:mod:`.rewrite`).

The custom call is an internal interface of jaxlib, so :func:`onednn_status` checks it once
per process by comparing it with ``lax.conv_general_dilated`` on small cases.
"""

from __future__ import annotations

import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax._src.interpreters import ad, batching, mlir
from jax._src.lax import convolution as _conv
from jax.extend import core as jcore

from . import _library
from .conv_forward import forward_lowering

__all__ = ["MAX_NATIVE_KERNEL", "MAX_ONEDNN_WINDOW", "NHWC_HWIO", "conv_with_xla_layouts", "native_conv_p",
           "native_forward", "native_forward_eligible", "onednn_conv_native_wgrad_p", "onednn_conv_p",
           "onednn_eligible", "onednn_status"]

MAX_ONEDNN_WINDOW = 49  # kernel elements per feature pair: up to 7x7 in 2-D
MAX_NATIVE_KERNEL = 7  # native forward convolutions: kernels up to 7x7


def _conv_primitive(name: str, transpose_lhs: Callable, transpose_rhs: Callable) -> jcore.Primitive:
    """A convolution with exactly ``lax.conv_general_dilated_p``'s parameters and semantics.

    Shape rules, autodiff and batching are lax's own (batching through lax's convolution);
    the caller registers its CPU lowering; its transposes are ``transpose_lhs`` and
    ``transpose_rhs``.
    """
    p = jcore.Primitive(name)
    p.def_impl(functools.partial(dispatch.apply_primitive, p))
    p.def_effectful_abstract_eval(lambda *a, **k: lax.conv_general_dilated_p.abstract_eval(*a, **k))
    # Bilinear: tangents are the same primitive again; reverse mode uses lax-style transposes.
    ad.defbilinear(p, transpose_lhs, transpose_rhs)
    batching.fancy_primitive_batchers[p] = _conv._conv_general_dilated_batch_rule
    mlir.register_lowering(p, _conv._conv_general_dilated_lower)
    return p


def _transpose_rhs_native(g, lhs, rhs, **params):
    """lax's weight-gradient transpose, its convolution run by the native kernel where it can."""
    from .rewrite import Rewrites, rewrite  # the rewrite binds these primitives: imported late

    rule = lambda g, lhs: _conv._conv_general_dilated_transpose_rhs(g, lhs, rhs, **params)
    return rewrite(rule, Rewrites(native_wgrad=True))(g, lhs)


def _transpose_lhs_native(g, lhs, rhs, **params):
    """lax's input-gradient transpose, its convolution run natively (stride 1: a forward
    convolution with the flipped kernel), by oneDNN or by XLA (strided: input dilation)."""
    from .rewrite import Rewrites, rewrite

    rule = lambda g, rhs: _conv._conv_general_dilated_transpose_lhs(g, lhs, rhs, **params)
    # no width gate: the forward convolution passed it, and a stride-1 input gradient is as wide
    return rewrite(rule, Rewrites(onednn=onednn_status()[0], native_wgrad=True, native_forward=True,
                                  min_native_width=0))(g, rhs)


onednn_conv_p = _conv_primitive("onednn_conv_general_dilated", _conv._conv_general_dilated_transpose_lhs,
                                _conv._conv_general_dilated_transpose_rhs)
# The same, for convolutions="native": its weight gradients (reverse mode through it) are native.
onednn_conv_native_wgrad_p = _conv_primitive("onednn_conv_general_dilated_native_wgrad",
                                             _conv._conv_general_dilated_transpose_lhs, _transpose_rhs_native)
# A 2-D convolution in NHWC/HWIO/NHWC form (as the rewrite binds it) run by hqjax's native
# forward kernel (native_kernels.cc); reverse mode gives native weight gradients and input
# gradients that are rewritten again.
native_conv_p = _conv_primitive("native_conv_general_dilated", _transpose_lhs_native, _transpose_rhs_native)
NHWC_HWIO = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _ints(xs) -> list[str]:
    return [str(int(x)) for x in xs]  # proto3 JSON spells 64-bit integers as strings


def _onednn_config(window_strides, padding, rhs_dilation, dimension_numbers, feature_group_count) -> str:
    lhs, rhs, out = dimension_numbers
    nd = str(len(lhs))
    data = lambda spec: {"batch_dim": str(spec[0]), "feature_dim": str(spec[1]), "spatial_dims": _ints(spec[2:])}
    return json.dumps({"onednn_conv_config": {
        "dims": nd,
        "feature_groups": str(feature_group_count),
        "input": {"dims": nd, "data": data(lhs)},
        "kernel": {"dims": nd, "filter": {"output_feature_dim": str(rhs[0]), "input_feature_dim": str(rhs[1]),
                                          "spatial_dims": _ints(rhs[2:])}},
        "output": {"dims": nd, "data": data(out)},
        "window": {"pad_left": _ints(p[0] for p in padding), "pad_right": _ints(p[1] for p in padding),
                   "strides": _ints(window_strides), "window_dilations": _ints(rhs_dilation)},
    }})


def _onednn_lowering(ctx, lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, batch_group_count, precision, preferred_element_type, **_):
    config = _onednn_config(window_strides, padding, rhs_dilation, dimension_numbers, feature_group_count)
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return mlir.custom_call("__onednn$convolution", result_types=[out_type], operands=[lhs, rhs],
                            backend_config=config, api_version=1).results


mlir.register_lowering(onednn_conv_p, _onednn_lowering, platform="cpu")
mlir.register_lowering(onednn_conv_native_wgrad_p, _onednn_lowering, platform="cpu")


def _native_lowering(ctx, lhs, rhs, **params):
    lhs_aval, rhs_aval = ctx.avals_in
    if (_library.register()[0] and tuple(params["dimension_numbers"]) == tuple(NHWC_HWIO)
            and native_forward_eligible(lhs_aval, rhs_aval, ctx.avals_out[0], params)):
        return forward_lowering(ctx, lhs, rhs, window_strides=params["window_strides"],
                                          padding=params["padding"])
    return _conv._conv_general_dilated_lower(ctx, lhs, rhs, **params)  # still correct, through XLA


mlir.register_lowering(native_conv_p, _native_lowering, platform="cpu")


def onednn_eligible(lhs_aval, rhs_aval, params: dict) -> bool:
    """Whether oneDNN's direct forward convolution can run this ``conv_general_dilated``.

    float32, no input (base) dilation, no batch groups, non-negative padding and a window of
    at most ``MAX_ONEDNN_WINDOW`` elements (larger windows are weight gradients, for which
    oneDNN's forward kernel falls back to a reference loop).
    """
    _, rhs_spec, _ = params["dimension_numbers"]
    window = int(np.prod([rhs_aval.shape[d] for d in rhs_spec[2:]]))
    return (lhs_aval.dtype == jnp.float32 and rhs_aval.dtype == jnp.float32
            and params.get("preferred_element_type") in (None, jnp.float32)
            and all(int(d) == 1 for d in params["lhs_dilation"])
            and params["batch_group_count"] == 1 and params["feature_group_count"] == 1
            and all(lo >= 0 and hi >= 0 for lo, hi in params["padding"])
            and 1 <= len(rhs_spec) - 2 <= 3 and window <= MAX_ONEDNN_WINDOW)


def native_forward_eligible(lhs_aval, rhs_aval, out_aval, params: dict, min_width: int = 0) -> bool:
    """Whether the native forward kernel can run this ``conv_general_dilated`` (any layout).

    2-D, float32, no input or window dilation, no groups, non-negative padding and a kernel
    of at most ``MAX_NATIVE_KERNEL`` in each spatial dimension (and an output at least
    ``min_width`` wide).
    """
    _, rhs_spec, out_spec = params["dimension_numbers"]
    return (len(rhs_spec) == 4 and out_aval.shape[out_spec[3]] >= min_width
            and all(a.dtype == jnp.float32 for a in (lhs_aval, rhs_aval, out_aval))
            and params.get("preferred_element_type") in (None, jnp.float32)
            and tuple(params["lhs_dilation"]) == (1, 1) and tuple(params["rhs_dilation"]) == (1, 1)
            and params["batch_group_count"] == 1 and params["feature_group_count"] == 1
            and all(lo >= 0 and hi >= 0 for lo, hi in params["padding"])
            and all(1 <= rhs_aval.shape[d] <= MAX_NATIVE_KERNEL for d in rhs_spec[2:]))


def native_forward(lhs, rhs, *, dimension_numbers, **params):
    """``lax.conv_general_dilated_p`` (2-D) as :data:`native_conv_p`, operands transposed to NHWC/HWIO."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    perm = lambda x, p: x if tuple(p) == tuple(range(x.ndim)) else jnp.transpose(x, p)
    out = native_conv_p.bind(perm(lhs, (lhs_spec[0], lhs_spec[2], lhs_spec[3], lhs_spec[1])),
                             perm(rhs, (rhs_spec[2], rhs_spec[3], rhs_spec[1], rhs_spec[0])),
                             dimension_numbers=NHWC_HWIO, **params)
    back = [0] * 4
    back[out_spec[0]], back[out_spec[1]], back[out_spec[2]], back[out_spec[3]] = 0, 3, 1, 2
    return perm(out, back)


def conv_with_xla_layouts(lhs, rhs, *, dimension_numbers, **params):
    """``lax.conv_general_dilated_p`` with operands pre-transposed to XLA:CPU's preferred layout.

    Same result; the transposes XLA would insert become visible to JAX, so ``jax.linearize``
    computes them once and keeps them as residuals instead of repeating them in every product.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nd = len(lhs_spec) - 2
    perm = lambda x, p: x if tuple(p) == tuple(range(x.ndim)) else jnp.transpose(x, p)
    canonical = lax.ConvDimensionNumbers((0, nd + 1, *range(1, nd + 1)), (nd + 1, nd, *range(nd)),
                                         (0, nd + 1, *range(1, nd + 1)))
    out = lax.conv_general_dilated_p.bind(perm(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])),
                                          perm(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])),
                                          dimension_numbers=canonical, **params)
    back = [0] * (nd + 2)
    back[out_spec[0]], back[out_spec[1]] = 0, nd + 1
    for i, d in enumerate(out_spec[2:]):
        back[d] = i + 1
    return perm(out, back)


_PROBES = (  # (lhs shape, rhs shape, strides, padding, rhs dilation, dimension numbers)
    ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 3, 9, 8), (5, 3, 3, 2), (2, 1), ((0, 2), (1, 0)), (1, 2), ("NCHW", "OIHW", "NCHW")),
    ((3, 10, 2), (4, 2, 5), (2,), ((2, 1),), (1,), ("NWC", "WIO", "NWC")),
)


def _params(f, a, b) -> dict:
    """The ``conv_general_dilated_p`` parameters of the one convolution in ``f(a, b)``."""
    (eqn,) = [e for e in jax.make_jaxpr(f)(a, b).jaxpr.eqns if e.primitive is lax.conv_general_dilated_p]
    return eqn.params


@functools.lru_cache(maxsize=1)
def onednn_status() -> tuple[bool, str]:
    """``(available, reason)``: whether jaxlib's oneDNN convolution runs here and agrees with XLA.

    Compiled and compared with ``lax.conv_general_dilated`` on the CPU once per process, on
    cases that exercise layouts, strides, asymmetric padding and dilation, because the
    custom call's configuration format is internal to jaxlib and could change.
    """
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as e:
        return False, f"no CPU backend: {e}"
    rng = np.random.default_rng(0)
    try:
        # eagerly, even when first asked while the caller's function is being traced
        with jax.ensure_compile_time_eval():
            for lhs_shape, rhs_shape, strides, padding, dilation, dn in _PROBES:
                lhs = jax.device_put(rng.standard_normal(lhs_shape).astype(np.float32), cpu)
                rhs = jax.device_put(rng.standard_normal(rhs_shape).astype(np.float32), cpu)
                f = lambda a, b: lax.conv_general_dilated(a, b, strides, padding, rhs_dilation=dilation,
                                                          dimension_numbers=dn)
                want = np.asarray(jax.jit(f)(lhs, rhs))
                got = np.asarray(jax.jit(lambda a, b: onednn_conv_p.bind(a, b, **_params(f, a, b)))(lhs, rhs))
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4,
                                                              atol=1e-4 * np.abs(want).max()):
                    return _failed(f"jaxlib's oneDNN convolution disagrees with XLA's on {dn} "
                                   f"(max error {np.abs(got - want).max():.3g})")
    except Exception as e:  # an unknown custom call target, a changed config format, ...
        return _failed(f"jaxlib {jax.__version__} cannot run the oneDNN convolution custom call: "
                       f"{type(e).__name__}: {e}")
    return True, "ok"


def _failed(reason: str) -> tuple[bool, str]:
    _library.warn_once(f"hqjax.kernels.cpu: {reason}; XLA's convolutions run instead")
    return False, reason
