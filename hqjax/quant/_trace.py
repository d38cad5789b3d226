"""Trace a Flax model (Linen or NNX) into a flat list of live equations with its layers marked.

The integer lowering (:mod:`hqjax.quant._lowering`) reads a model's own program rather than a
list of known classes: ``jax.make_jaxpr`` of the float forward on one example, where every
``Dense``/``Conv``/``BatchNorm`` call is wrapped (Linen: ``nn.intercept_methods``; NNX: a
wrapper module swapped into a merged copy) so that its output reaches the jaxpr through an
opaque ``hqjax_layer`` equation ``y' = layer(x, y)``. The lowering treats that equation as one
layer (its parameters are read by module path), and the layer's own equations, on which
nothing else depends, are dropped. Every module call also opens a name scope, so any other
equation knows the module path it sits in (for error messages and float islands).

Nested ``jit`` and ``custom_jvp``/``custom_vjp`` calls (``nn.relu``, ``jnp.pad``, ...) are
inlined; equations whose inputs are all constants are evaluated here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal, Primitive

__all__: list[str] = []

LAYER_KINDS = {"Dense": "dense", "Conv": "conv", "BatchNorm": "batchnorm",
               "Linear": "dense", "DenseGeneral": "dense", "LinearGeneral": "dense", "Einsum": "dense"}

layer_p = Primitive("hqjax_layer")
layer_p.def_impl(lambda x, y, **_: y)
layer_p.def_abstract_eval(lambda x, y, **_: y)

_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
           "checkpoint": "jaxpr"}
_SCOPE = re.compile(r"hqjaxmod(\d+)")


@dataclasses.dataclass(frozen=True)
class Eqn:
    """One flat equation: ``prim`` applied to ``invars`` (vars or constants) gives ``outvars``.

    ``module`` is the path of the innermost module call it sits in ('' at top level),
    ``functions`` the names of the ``jit``s it was inlined from, ``eqn`` the original (float
    islands re-run it), ``layer`` the index of the layer record for ``hqjax_layer``.
    """

    prim: str
    invars: tuple
    outvars: tuple
    params: dict
    module: str
    functions: tuple
    eqn: Any
    layer: int | None = None


@dataclasses.dataclass(frozen=True)
class Layer:
    """A Dense/Conv/BatchNorm call: kind, module path and class, and attributes read from
    the module object (BatchNorm epsilon, axis and mode)."""

    kind: str
    path: str
    module_type: str
    attrs: dict


@dataclasses.dataclass(frozen=True)
class Traced:
    """The flattened program: live equations in order, its input and output vars, known
    constants (``{var: value}``), the layer records and each module path's class name."""

    eqns: tuple
    invar: Any
    outvar: Any
    consts: dict
    layers: tuple
    modules: dict
    defs: dict  # every var produced by an equation -> that equation (live or not)


class _Recorder:
    def __init__(self):
        self.layers: list[Layer] = []
        self.paths: list[str] = []
        self.types: dict[str, str] = {}

    def scope(self, path: str, module_type: str):
        self.paths.append(path)
        self.types.setdefault(path, module_type)
        return jax.named_scope(f"hqjaxmod{len(self.paths) - 1}")

    def mark(self, kind: str, path: str, module_type: str, attrs: dict, x, y):
        self.layers.append(Layer(kind, path, module_type, attrs))
        return layer_p.bind(x, y, index=len(self.layers) - 1)


def _bn_attrs(mod, ndim, use_running_average):
    axis = mod.axis if isinstance(mod.axis, int) else tuple(mod.axis)
    return {"epsilon": float(mod.epsilon), "axis_ok": axis in (-1, ndim - 1),
            "inference": bool(use_running_average)}


def trace_linen(model, variables, example) -> Traced:
    """Trace ``model.apply(variables, example, train=False)`` with its layers marked."""
    import flax.linen as nn

    rec = _Recorder()

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        path = "/".join(mod.path)
        kind = LAYER_KINDS.get(type(mod).__name__) if isinstance(
            mod, (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum, nn.BatchNorm)) else None
        with rec.scope(path, type(mod).__name__):
            y = next_fun(*args, **kwargs)
            if context.method_name != "__call__" or kind is None or not args:
                return y
            attrs = {}
            if kind == "batchnorm":
                ura = nn.merge_param("use_running_average", mod.use_running_average,
                                     kwargs.get("use_running_average"))
                attrs = _bn_attrs(mod, jnp.ndim(args[0]), ura)
            return rec.mark(kind, path, type(mod).__name__, attrs, args[0], y)

    def forward(x):
        with nn.intercept_methods(intercept):
            return model.apply(variables, x, train=False)

    return _flatten(jax.make_jaxpr(forward)(example), rec)


def trace_nnx(graphdef, params, rest, example) -> Traced:
    """Trace an NNX model (``nnx.merge(graphdef, params, rest)``) called on ``example``,
    each module call wrapped so that layers are marked and paths known."""
    from flax import nnx

    from hqjax._nnx import layer_modules, with_layer_hooks

    rec = _Recorder()
    model = nnx.merge(graphdef, params, rest, copy=True)
    layer_types = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum, nnx.BatchNorm)
    training = [name for _, name, n in layer_modules(model, (nnx.BatchNorm,)) if not n.use_running_average]
    if training:
        raise ValueError(f"BatchNorm {training[0]!r} is in training mode; integer inference folds its running "
                         f"averages: call model.eval() before nnx.split / quantize_nnx_model")

    def hook_for(path, module):
        def hook(inner, x, *args, **kwargs):
            with rec.scope(path, type(inner).__name__):
                y = inner(x, *args, **kwargs)
                if not isinstance(inner, layer_types):
                    return y
                kind = LAYER_KINDS[type(inner).__name__]
                attrs = {}
                if kind == "batchnorm":
                    ura = kwargs.get("use_running_average", inner.use_running_average)
                    attrs = _bn_attrs(inner, jnp.ndim(x), ura)
                return rec.mark(kind, path, type(inner).__name__, attrs, x, y)
        return hook

    with with_layer_hooks(model, hook_for, (nnx.Module,)):  # every module call opens its scope
        return _flatten(jax.make_jaxpr(lambda x: model(x))(example), rec)


# --------------------------------------------------------------------------- flattening
def _module_of(stack: str, rec: _Recorder) -> str:
    found = _SCOPE.findall(stack)
    return rec.paths[int(found[-1])] if found else ""


class FVar:
    """A value of the flattened program (fresh per inlined call: a cached ``jit``'s jaxpr is
    shared by all its calls, so its own vars cannot name values)."""

    __slots__ = ("aval",)

    def __init__(self, aval):
        self.aval = aval

    def __repr__(self):
        return f"FVar({self.aval.str_short()})"


def _flatten(closed, rec: _Recorder) -> Traced:
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
        raise ValueError(f"integer lowering takes a model with one input array and one output array; "
                         f"this one has {len(jaxpr.invars)} inputs and {len(jaxpr.outvars)} outputs")
    consts: dict = {}
    flat: list[Eqn] = []

    def bind_consts(constvars, values, env):
        for v, c in zip(constvars, values):
            env[v] = FVar(v.aval)
            consts[env[v]] = c

    def inline(jx, env, stack, functions):
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        for e in jx.eqns:
            full = f"{stack}/{e.source_info.name_stack}" if stack else str(e.source_info.name_stack)
            sub = _INLINE.get(e.primitive.name)
            if sub is not None and sub in e.params:
                inner = e.params[sub]
                inner_jaxpr = getattr(inner, "jaxpr", inner)
                inner_env: dict = {}
                bind_consts(inner_jaxpr.constvars, getattr(inner, "consts", ()), inner_env)
                inner_env.update(zip(inner_jaxpr.invars, (read(v) for v in e.invars)))
                name = e.params.get("name", e.primitive.name)
                outs = inline(inner_jaxpr, inner_env, full, (*functions, str(name)))
                env.update(zip(e.outvars, outs))
                continue
            layer = e.params["index"] if e.primitive is layer_p else None
            outs = tuple(FVar(v.aval) for v in e.outvars)
            env.update(zip(e.outvars, outs))
            flat.append(Eqn(e.primitive.name, tuple(read(v) for v in e.invars), outs,
                            dict(e.params), _module_of(full, rec), functions, e, layer))
        return [read(v) for v in jx.outvars]

    top_env: dict = {}
    bind_consts(jaxpr.constvars, closed.consts, top_env)
    invar = top_env[jaxpr.invars[0]] = FVar(jaxpr.invars[0].aval)
    outvar = inline(jaxpr, top_env, "", ())[0]
    defs = {v: e for e in flat for v in e.outvars}
    live = _live(flat, outvar, defs)
    kept = []
    for e in flat:
        if id(e) not in live:
            continue
        if e.layer is None and all(_is_const(v, consts) for v in e.invars):
            vals = [_value(v, consts) for v in e.invars]
            outs = bind_eqn(e.eqn, vals)
            consts.update({v: np.asarray(o) for v, o in zip(e.outvars, outs)})
            continue
        kept.append(e)
    return Traced(tuple(kept), invar, outvar, consts, tuple(rec.layers), dict(rec.types), defs)


def bind_eqn(eqn, args) -> list:
    """Run one original jaxpr equation on values (as ``jax.core.eval_jaxpr`` does)."""
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _is_const(v, consts) -> bool:
    return not _is_var(v) or v in consts


def _is_var(v) -> bool:
    return isinstance(v, FVar)


def _value(v, consts):
    return consts[v] if _is_var(v) else v


def _live(flat, outvar, defs) -> set:
    """Ids of the equations the output depends on; a layer marker needs only its input
    (its second operand, the layer's own float computation, is dropped)."""
    live, stack = set(), [outvar]
    while stack:
        v = stack.pop()
        if not _is_var(v) or v not in defs or id(defs[v]) in live:
            continue
        e = defs[v]
        live.add(id(e))
        stack.extend(e.invars[:1] if e.layer is not None else e.invars)
    return live


def layer_slice(traced: Traced, eqn: Eqn, prim: str) -> list:
    """The ``prim`` equations inside a layer (between its input and its output), e.g. the
    ``conv_general_dilated`` whose geometry the lowering reads."""
    x, y = eqn.invars
    found, stack, seen = [], [y], set()
    while stack:
        v = stack.pop()
        if v is x or not _is_var(v) or v not in traced.defs or id(traced.defs[v]) in seen:
            continue
        e = traced.defs[v]
        seen.add(id(e))
        if e.prim == prim:
            found.append(e)
        stack.extend(e.invars)
    return found
