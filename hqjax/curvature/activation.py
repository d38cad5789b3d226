"""Activation Hessian traces: HAWQ-V2's activation sensitivity (Dong et al. 2020, Sec. 3.3).

The sensitivity of quantizing a layer's input activation ``a_l`` is the trace of the loss
Hessian with respect to ``a_l``. We add a zero perturbation ``eps_l`` to the input of every
layer that owns a kernel (Flax's ``perturb`` idea, done with ``nn.intercept_methods`` so any
Linen model works unchanged), take the Hessian of the loss with respect to the
perturbations at zero, and run Hutchinson on it with one block per layer: one pass over the
probes gives every layer's trace.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hqjax._linen import with_train_arg
from hqjax.curvature.operators import hessian
from hqjax.curvature.results import TraceResult
from hqjax.curvature.trace import trace
from hqjax.tree import blocks as make_blocks

__all__ = ["activation_traces", "activation_perturbations"]

PyTree = Any


def _layer_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path)


def _owns_kernel(module: nn.Module) -> bool:
    return any(module.has_variable("params", n) for n in ("kernel", "embedding"))


def _perturbed_apply(model: nn.Module, variables: PyTree, x, eps: dict | None, record: dict | None, **apply_kwargs):
    """``model.apply`` with ``eps[path]`` added to the first input of each kernel-owning layer."""
    if "train" in apply_kwargs:
        model = with_train_arg(model)

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not args or not _owns_kernel(mod):
            return next_fun(*args, **kwargs)
        path = _layer_path(mod)
        lifted = [p for p in getattr(mod.scope, "debug_path", ()) if str(p).startswith(("scan(", "vmap("))]
        if lifted:
            raise ValueError(f"layer {path!r} runs inside {lifted[0]}: one perturbation of its input would be "
                             f"shared by every layer of the stack, so activation traces are not per layer there; "
                             f"use the weight traces, which are (hqjax.blocks(params, stacked=...))")
        if record is not None:
            record.setdefault(path, jax.ShapeDtypeStruct(jnp.shape(args[0]), jnp.result_type(args[0])))
        if eps is not None and path in eps:
            args = (args[0] + eps[path],) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        if apply_kwargs.get("train") and "batch_stats" in variables:
            # Train-mode BatchNorm uses batch statistics; its running-average update is discarded.
            return model.apply(variables, x, mutable=["batch_stats"], **apply_kwargs)[0]
        return model.apply(variables, x, **apply_kwargs)


def activation_perturbations(model: nn.Module, variables: PyTree, x, **apply_kwargs) -> dict[str, jax.Array]:
    """Zero perturbations ``{layer path: zeros like the layer's input}`` for every kernel-owning layer."""
    record: dict = {}
    jax.eval_shape(lambda v, xx: _perturbed_apply(model, v, xx, None, record, **apply_kwargs), variables, x)
    if not record:
        raise ValueError(f"{type(model).__name__} has no layer with a kernel/embedding parameter to perturb")
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in record.items()}


def activation_traces(model: nn.Module, variables: PyTree, x, loss_fn: Callable[[jax.Array], jax.Array],
                      key: jax.Array, *, layers=None, train: bool = False, **trace_kwargs) -> TraceResult:
    """Hutchinson trace of the loss Hessian w.r.t. each layer's input activation (HAWQ-V2).

    Parameters
    ----------
    model, variables : a Flax Linen model and its variables (``{'params': ..., ...}``).
    x : one input batch.
    loss_fn : ``loss_fn(outputs) -> scalar`` (e.g. mean cross-entropy against this batch's labels).
    key : PRNG key for the probes.
    layers : layer paths to include (default: every layer that owns a kernel).
    train : passed to ``model.apply`` (explicit; BatchNorm in train mode couples examples).
    trace_kwargs : ``num_probes``, ``dist``, ``chunk_size``, ``tol``, ``method``, ``loop``
        for ``hqjax.trace``.

    Returns
    -------
    TraceResult whose blocks are the layers: ``block_traces[l] = tr(d^2 L / d a_l^2)`` for
    the batch-mean loss ``L`` (a sum over the batch's examples of their own traces divided
    by the batch size), with ``total`` their sum.
    """
    eps = activation_perturbations(model, variables, x, train=train)
    if layers is not None:
        missing = [l for l in layers if l not in eps]
        if missing:
            raise ValueError(f"no kernel-owning layer named {missing}; layers are {list(eps)}")
        eps = {k: v for k, v in eps.items() if k in layers}

    def f(e):
        return loss_fn(_perturbed_apply(model, variables, x, e, None, train=train))

    blk = make_blocks(eps, rule=lambda p: p)
    return trace(hessian(f, eps), eps, key, blocks=blk, **trace_kwargs)
