"""The jaxpr rewrite: a function's convolutions and matrix products rerouted for XLA:CPU.

:func:`rewrite` traces a function to a jaxpr and evaluates it again, binding each
convolution and each matrix product XLA:CPU handles poorly to a faster primitive with the
same value:

1. weight gradients (2-D float32 convolutions with an image-sized window) to the native
   kernel (:mod:`.conv_weight_grad`);
2. small-window 2-D convolutions at least ``min_native_width`` wide (forward passes,
   stride-1 input gradients and their tangents) to the native forward kernel
   (:data:`.conv_primitives.native_conv_p`), others to jaxlib's oneDNN
   (:data:`.conv_primitives.onednn_conv_p`);
3. every other convolution to ``lax``'s with its operands transposed explicitly to the
   layout XLA:CPU wants, so ``jax.linearize`` keeps the transposes as residuals;
4. weight gradients over tokens and batched products (attention) to the native strided
   GEMM (:mod:`.matmul`), folding ``transpose(dy^T x)`` into the swapped product.

Which of these apply is a :class:`Rewrites` value; :func:`hqjax.kernels.cpu.accelerate`
decides it from the kernels' self-checks. Convolutions inside control flow (``scan``,
``while_loop``, ``cond``) are left as they are.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, NamedTuple

import jax
from jax import lax
from jax.extend import core as jcore

from .conv_primitives import (conv_with_xla_layouts, native_forward, native_forward_eligible, onednn_conv_native_wgrad_p,
                              onednn_conv_p, onednn_eligible)
from .conv_weight_grad import weight_grad_form
from .matmul import matmul_form, strided_matmul

__all__ = ["Rewrites", "candidates", "evaluate", "rewrite"]

# On ResNet-20's 8x8 64->64 layers (rows of two 4-pixel tiles) the native forward kernel
# measured slower than oneDNN; 16 and 32 wide, faster.
MIN_NATIVE_WIDTH = 12


class Rewrites(NamedTuple):
    """Which rewrites :func:`rewrite` applies (each False leaves that kind to XLA)."""

    onednn: bool = False
    native_wgrad: bool = False
    native_forward: bool = False
    native_matmul: bool = False
    min_native_width: int = MIN_NATIVE_WIDTH


def _rewrite_convolution(eqn, ins, use: Rewrites):
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    if use.native_wgrad and (wgrad := weight_grad_form(lhs, rhs, eqn.outvars[0].aval, eqn.params)):
        return wgrad(*ins)
    if use.native_forward and native_forward_eligible(lhs, rhs, eqn.outvars[0].aval, eqn.params,
                                                                    use.min_native_width):
        return native_forward(*ins, **eqn.params)
    if use.onednn and onednn_eligible(lhs, rhs, eqn.params):
        prim = onednn_conv_native_wgrad_p if use.native_wgrad else onednn_conv_p
        return prim.bind(*ins, **eqn.params)
    return conv_with_xla_layouts(*ins, **eqn.params)


def _transposed_products(jaxpr) -> dict:
    """The products of ``jaxpr`` to compute swapped, with their transposes folded away.

    JAX's autodiff writes a weight gradient as ``transpose(dot_general(dy, x))``, and XLA:CPU
    runs it as a product followed by a transposed copy of the result. When the product's only use is a transpose that swaps its two free
    groups, ``dot_general(x, dy)`` with the contracting axes swapped is the transposed result,
    and the native GEMM computes it reading both operands where they lie.

    Returns
    -------
    ``{id(product): None, id(transpose): ((lhs, rhs), dimension_numbers)}`` for each such
    pair whose swapped product :func:`~.matmul.matmul_form` takes.
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


def _eval_rewritten(jaxpr, consts, args, use: Rewrites):
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


def _sub_jaxprs(eqn):
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    return [inner.jaxpr] if eqn.primitive.name in ("pjit", "jit", "closed_call") and inner is not None else []


def candidates(jaxpr) -> set[str]:
    """The kinds of rewrite ``jaxpr`` has something for, before any kernel is built or checked.

    A subset of ``{"native_wgrad", "native_forward", "onednn", "native_matmul"}``; empty when
    the function has no float32 convolution or product the rewrite would take, so that
    :func:`hqjax.kernels.cpu.accelerate` compiles nothing for it.
    """
    kinds: set[str] = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
            if weight_grad_form(lhs, rhs, out, eqn.params):
                kinds.add("native_wgrad")
            elif native_forward_eligible(lhs, rhs, out, eqn.params):
                kinds.update(("native_forward", "onednn"))
            elif onednn_eligible(lhs, rhs, eqn.params):
                kinds.add("onednn")
        elif eqn.primitive is lax.dot_general_p and matmul_form(eqn.invars[0].aval, eqn.invars[1].aval, eqn.params,
                                                                 transposed_output=True):
            kinds.add("native_matmul")
        for inner in _sub_jaxprs(eqn):
            kinds |= candidates(inner)
    return kinds


def rewrite(fn: Callable, use: Rewrites) -> Callable:
    """``fn`` with its convolutions and matrix products rewritten as ``use`` says.

    Parameters
    ----------
    fn : any function of arrays/pytrees that JAX can trace (e.g. ``jax.grad(loss)``).
    use : which rewrites apply; the caller checks the kernels first (without the library a
        native primitive lowers to XLA's operation: correct, no faster).

    Returns
    -------
    A function with ``fn``'s signature and values. It works under ``jit``, ``grad``, ``jvp``,
    ``linearize`` and ``vmap`` (batched native operations fall back to XLA's). On GPU/TPU the
    primitives lower to XLA's operations, so the rewrite is harmless there but useless.
    """

    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        return jax.tree.unflatten(jax.tree.structure(out_shape), evaluate(closed, jax.tree.leaves(args), use))

    return functools.wraps(fn)(rewritten) if hasattr(fn, "__name__") else rewritten


def evaluate(closed, args, use: Rewrites) -> list:
    """The outputs of the closed jaxpr ``closed`` on the flat ``args``, rewritten as ``use`` says."""
    return _eval_rewritten(closed.jaxpr, closed.consts, args, use)
