"""Faster float convolutions on XLA:CPU: oneDNN for small windows, explicit layouts for the rest.

Why this exists (measured on ResNet-20, batch 128, benchmarks/RESULTS.md): XLA:CPU runs
convolutions through Eigen or YNNPACK, and every Hessian-vector product of a CNN is mostly
convolutions: the forward tangents, the input gradients and their tangents (3x3 windows) and
the weight gradients and their tangents (a window as large as the image). Two rewrites of a
function's convolutions make those cheaper without changing what is computed:

1. Convolutions with small windows (forward passes, input gradients) run as jaxlib's own
   oneDNN custom call ``__onednn$convolution`` (the one XLA's oneDNN rewriter emits; this
   jaxlib build carries the runtime but does not enable the rewriter). oneDNN's direct
   convolution was 1.3-1.6x faster than XLA's on ResNet-20's 3x3 layers.
2. Every other convolution (weight gradients, strided transposes) gets its operands
   transposed explicitly to the layout XLA:CPU's convolution wants (``[batch, spatial...,
   feature]`` and ``[spatial..., in, out]``). XLA inserts the same transposes itself; made
   explicit, they become ordinary operations that ``jax.linearize`` computes once and keeps
   as residuals, instead of repeating them in every product (ResNet-20 linearized HVP:
   418 -> 366 ms).

3. With ``native_wgrad`` (``convolutions="native"``, and ``"auto"`` when it passes its
   self-check), weight gradients run as :mod:`.cpu_wgrad`'s native kernel instead, both the
   ones already in a differentiated function and the transposes of oneDNN convolutions.
4. With ``native_forward`` (``convolutions="native"``/``"auto"`` when :data:`NATIVE_FORWARD`
   and :func:`~.cpu_wgrad.native_forward_status` pass), 2-D small-window convolutions
   (forward passes, stride-1 input gradients and their tangents) run as :data:`native_conv_p`,
   the native forward kernel of the same library, instead of oneDNN: operands transposed to
   NHWC/HWIO, bilinear, reverse mode through lax's transposes rewritten again (native weight
   gradients; stride-1 input gradients native, strided ones XLA's), ``vmap`` through lax.
5. With ``native_matmul`` (``"native"``/``"auto"`` when :data:`NATIVE_MATMUL` and
   :func:`~.cpu_matmul.native_matmul_status` pass), the float32 matrix products XLA:CPU
   handles worst, weight gradients over tokens and batched products (attention), run as
   :data:`~.cpu_matmul.strided_matmul_p`, a native GEMM that reads operands through strides
   (encoder gradient 1.2-1.3x faster, benchmarks/RESULTS.md); a weight gradient autodiff
   wrote as ``transpose(dy^T x)`` becomes the product ``x^T dy``, without XLA's transposed
   copy (:func:`_transposed_products`; MLP linearized HVP 1.1x). Despite this module's
   name, the curvature operators of transformers and MLPs are sped up by this rewrite too.

oneDNN's forward convolution with an image-sized window (a weight gradient) took 1.8 s
against 5 ms for XLA's, hence the window limit. The custom call is an internal interface of
jaxlib, so :func:`onednn_status` checks it once per process by comparing it with
``lax.conv_general_dilated`` on small cases; if it fails, ``convolutions="auto"`` keeps
XLA's convolutions.
"""

from __future__ import annotations

import collections
import functools
import json
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax._src.interpreters import ad, batching, mlir
from jax._src.lax import convolution as _conv
from jax.extend import core as jcore

from . import cpu_wgrad
from .cpu_matmul import matmul_form, native_matmul_status, strided_matmul
from .cpu_wgrad import native_forward_status, native_wgrad_status, weight_grad_form

__all__ = ["CONVOLUTIONS", "cpu_convolutions", "native_conv_p", "onednn_conv_p", "onednn_status",
           "resolve_convolutions"]

CONVOLUTIONS = ("auto", "xla", "onednn", "native")
MAX_ONEDNN_WINDOW = 49  # kernel elements per feature pair: up to 7x7 in 2-D
MAX_NATIVE_KERNEL = 7  # native forward convolutions: kernels up to 7x7
# Whether convolutions="native" runs small-window convolutions through the native forward
# kernel (else oneDNN's): on only where it measured faster than oneDNN per layer.
NATIVE_FORWARD = True
# ...and only for outputs at least this wide: on ResNet-20's 8x8 64->64 layers (rows of two
# 4-pixel tiles) the native kernel measured slower than oneDNN; 16 and 32 wide, faster.
MIN_NATIVE_WIDTH = 12
# Weight gradients over tokens and batched products through cpu_matmul in 'native' mode.
NATIVE_MATMUL = True


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
    rule = lambda g, lhs: _conv._conv_general_dilated_transpose_rhs(g, lhs, rhs, **params)
    return cpu_convolutions(rule, onednn=False, native_wgrad=True)(g, lhs)


def _transpose_lhs_native(g, lhs, rhs, **params):
    """lax's input-gradient transpose, its convolution run natively (stride 1: a forward
    convolution with the flipped kernel), by oneDNN or by XLA (strided: input dilation)."""
    rule = lambda g, rhs: _conv._conv_general_dilated_transpose_lhs(g, lhs, rhs, **params)
    return cpu_convolutions(rule, onednn=onednn_status()[0], native_wgrad=True, native_forward=True)(g, rhs)


onednn_conv_p = _conv_primitive("onednn_conv_general_dilated", _conv._conv_general_dilated_transpose_lhs,
                                _conv._conv_general_dilated_transpose_rhs)
# The same, for convolutions="native": its weight gradients (reverse mode through it) are native.
onednn_conv_native_wgrad_p = _conv_primitive("onednn_conv_general_dilated_native_wgrad",
                                             _conv._conv_general_dilated_transpose_lhs, _transpose_rhs_native)
# A 2-D convolution in NHWC/HWIO/NHWC form (as the rewrite binds it) run by hqjax's native
# forward kernel (cpu_wgrad.cc); reverse mode gives native weight gradients and input
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
    if (cpu_wgrad._register()[0] and tuple(params["dimension_numbers"]) == tuple(NHWC_HWIO)
            and native_forward_eligible(lhs_aval, rhs_aval, ctx.avals_out[0], params)):
        return cpu_wgrad.forward_lowering(ctx, lhs, rhs, window_strides=params["window_strides"],
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

    Same result; the transposes XLA would insert become visible to JAX (see module docstring).
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


class _Choices(NamedTuple):
    """Which rewrites :func:`cpu_convolutions` applies."""

    onednn: bool
    native_wgrad: bool
    native_fwd: bool
    native_matmul: bool


def _rewrite_convolution(eqn, ins, use: _Choices):
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    if use.native_wgrad and (wgrad := weight_grad_form(lhs, rhs, eqn.outvars[0].aval, eqn.params)):
        return wgrad(*ins)
    if use.native_fwd and native_forward_eligible(lhs, rhs, eqn.outvars[0].aval, eqn.params, MIN_NATIVE_WIDTH):
        return native_forward(*ins, **eqn.params)
    if use.onednn and onednn_eligible(lhs, rhs, eqn.params):
        prim = onednn_conv_native_wgrad_p if use.native_wgrad else onednn_conv_p
        return prim.bind(*ins, **eqn.params)
    return conv_with_xla_layouts(*ins, **eqn.params)


def _transposed_products(jaxpr) -> dict:
    """The products of ``jaxpr`` to compute swapped, with their transposes folded away.

    JAX's autodiff writes a weight gradient as ``transpose(dot_general(dy, x))``, and XLA:CPU
    runs it as a product followed by a transposed copy of the result (for a dense layer's
    1024 x 1024 kernel, that copy and the tangent's transposed add took ~7% of the MLP's profiled
    linearized HVP). When the product's only use is a transpose that swaps its two free
    groups, ``dot_general(x, dy)`` with the contracting axes swapped is the transposed result,
    and the native GEMM computes it reading both operands where they lie.

    Returns
    -------
    ``{id(product): None, id(transpose): ((lhs, rhs), dimension_numbers)}`` for each such
    pair whose swapped product :func:`~.cpu_matmul.matmul_form` takes.
    """
    uses = collections.Counter(v for e in jaxpr.eqns for v in e.invars if not isinstance(v, jcore.Literal))
    uses.update(v for v in jaxpr.outvars if not isinstance(v, jcore.Literal))
    products = {e.outvars[0]: e for e in jaxpr.eqns if e.primitive is lax.dot_general_p}
    out = {}
    for e in jaxpr.eqns:
        if e.primitive is not lax.transpose_p or e.invars[0] not in products or uses[e.invars[0]] != 1:
            continue
        dot = products[e.invars[0]]
        (lc, rc), (lb, _) = dot.params["dimension_numbers"]
        lhs, rhs = dot.invars
        n_lhs_free, n_rhs_free = lhs.aval.ndim - len(lc), rhs.aval.ndim - len(rc)
        swap = tuple(range(n_lhs_free, n_lhs_free + n_rhs_free)) + tuple(range(n_lhs_free))
        if lb or tuple(e.params["permutation"]) != swap:
            continue
        dn = ((tuple(rc), tuple(lc)), ((), ()))
        if matmul_form(rhs.aval, lhs.aval, dict(dot.params, dimension_numbers=dn), transposed_output=True):
            out[id(dot)] = None
            out[id(e)] = ((rhs, lhs), dn)
    return out


def _eval_rewritten(jaxpr, consts, args, use: _Choices):
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    folded = _transposed_products(jaxpr) if use.native_matmul else {}
    for eqn in jaxpr.eqns:
        if id(eqn) in folded:
            if folded[id(eqn)] is None:  # its transpose, further down, computes it swapped
                continue
            (a, b), dn = folded[id(eqn)]
            env[eqn.outvars[0]] = strided_matmul(read(a), read(b), dn)
            continue
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            outs = [_rewrite_convolution(eqn, ins, use)]
        elif (use.native_matmul and eqn.primitive is lax.dot_general_p
              and matmul_form(eqn.invars[0].aval, eqn.invars[1].aval, eqn.params)):
            outs = [strided_matmul(*ins, eqn.params["dimension_numbers"])]
        elif eqn.primitive.name in ("pjit", "jit", "closed_call"):
            # inlined: a nested jit is one more XLA computation boundary, not a semantic one
            inner = eqn.params.get("jaxpr") or eqn.params["call_jaxpr"]
            outs = _eval_rewritten(inner.jaxpr, inner.consts, ins, use)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def cpu_convolutions(fn: Callable, *, onednn: bool = True, native_wgrad: bool = False,
                     native_forward: bool = False, native_matmul: bool = False) -> Callable:
    """``fn`` with its convolutions rewritten for XLA:CPU (same values, faster there).

    Parameters
    ----------
    fn : any function of arrays/pytrees that JAX can trace (e.g. ``jax.grad(loss)``).
    onednn : run small-window convolutions through oneDNN (check :func:`onednn_status`
        first); if False only the explicit-layout rewrite is applied.
    native_wgrad : run 2-D float32 weight gradients through :mod:`.cpu_wgrad`'s native
        kernel (check :func:`~hqjax.kernels.cpu_wgrad.native_wgrad_status` first; without
        the library it lowers to XLA's convolution, correct but no faster).
    native_forward : run 2-D float32 small-window convolutions (forward passes, stride-1
        input gradients) through the native forward kernel instead of oneDNN (check
        :func:`~hqjax.kernels.cpu_wgrad.native_forward_status` first).
    native_matmul : run float32 matrix products that XLA:CPU transposes first (weight
        gradients over tokens, batched products) through :mod:`.cpu_matmul`'s native GEMM
        (check :func:`~hqjax.kernels.cpu_matmul.native_matmul_status` first).

    Returns
    -------
    A function with ``fn``'s signature. It works under ``jit``, ``grad``, ``jvp``,
    ``linearize`` and ``vmap`` (batched convolutions fall back to XLA's). Convolutions inside
    control flow (``scan``, ``while_loop``, ``cond``) are left as they are. On GPU/TPU the
    oneDNN primitive lowers to XLA's convolution, so the rewrite is harmless there but useless.
    """
    use = _Choices(onednn, native_wgrad, native_forward, native_matmul)

    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval_rewritten(closed.jaxpr, closed.consts, jax.tree.leaves(args), use)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return functools.wraps(fn)(rewritten) if hasattr(fn, "__name__") else rewritten


_PROBES = (  # (lhs shape, rhs shape, strides, padding, rhs dilation, dimension numbers)
    ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 3, 9, 8), (5, 3, 3, 2), (2, 1), ((0, 2), (1, 0)), (1, 2), ("NCHW", "OIHW", "NCHW")),
    ((3, 10, 2), (4, 2, 5), (2,), ((2, 1),), (1,), ("NWC", "WIO", "NWC")),
)


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
                got = np.asarray(jax.jit(cpu_convolutions(f))(lhs, rhs))
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4,
                                                              atol=1e-4 * np.abs(want).max()):
                    return False, (f"jaxlib's oneDNN convolution disagrees with XLA's on {dn} "
                                   f"(max error {np.abs(got - want).max():.3g})")
    except Exception as e:  # an unknown custom call target, a changed config format, ...
        return False, f"jaxlib {jax.__version__} cannot run the oneDNN convolution custom call: {type(e).__name__}: {e}"
    return True, "ok"


def resolve_convolutions(convolutions: str) -> str:
    """``'xla'``, ``'onednn'`` or ``'native'`` for a requested mode.

    ``'xla'`` leaves XLA's convolutions alone. ``'onednn'`` runs small windows through
    oneDNN and the rest through XLA (raises if oneDNN is unavailable). ``'native'``
    additionally runs weight gradients through the native kernel (raises if it is
    unavailable), small-window convolutions through the native forward kernel where
    :func:`native_forward_status` passes (else oneDNN where :func:`onednn_status` passes) and
    the matrix products :func:`~.cpu_matmul.matmul_form` picks through the native GEMM where
    :func:`~.cpu_matmul.native_matmul_status` passes. ``'auto'`` is the fastest
    of those whose self-checks pass when the default backend is the CPU, else ``'xla'``.
    """
    if convolutions not in CONVOLUTIONS:
        raise ValueError(f"convolutions must be one of {CONVOLUTIONS}, got {convolutions!r}")
    if convolutions == "xla":
        return "xla"
    if convolutions == "native":
        ok, reason = native_wgrad_status()
        if not ok:
            raise RuntimeError(f"convolutions='native' is unavailable: {reason}. Use convolutions='onednn' or 'xla'.")
        return "native"
    if convolutions == "onednn":
        ok, reason = onednn_status()
        if not ok:
            raise RuntimeError(f"convolutions='onednn' is unavailable: {reason}. Use convolutions='xla'.")
        return "onednn"
    if jax.default_backend() != "cpu":
        return "xla"
    if native_wgrad_status()[0]:
        return "native"
    return "onednn" if onednn_status()[0] else "xla"


def apply_convolutions(fn: Callable, convolutions: str) -> Callable:
    """``fn`` rewritten as :func:`resolve_convolutions` decides (unchanged for ``'xla'``)."""
    mode = resolve_convolutions(convolutions)
    if mode == "xla":
        return fn
    if mode == "onednn":
        return cpu_convolutions(fn)
    return cpu_convolutions(fn, onednn=onednn_status()[0], native_wgrad=True, native_forward=NATIVE_FORWARD
                            and native_forward_status()[0], native_matmul=NATIVE_MATMUL and native_matmul_status()[0])
