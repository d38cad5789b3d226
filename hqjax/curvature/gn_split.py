"""Per-layer Hessian traces as the exact Gauss-Newton trace plus a probed remainder.

For a loss ``L = (1/N) sum_n l(z_n, y_n)`` of the logits ``z_n(theta)`` the Hessian splits
(Schraudolph 2002; Martens 2020, Sec. 8.1) into

    H = G + R,    G = (1/N) sum_n J_n^T (d^2 l / dz^2) J_n,    R = (1/N) sum_n sum_c (dl/dz_{n,c}) d^2 z_{n,c} / dtheta^2.

``tr(G_bb)`` is computed exactly, every layer at once (:func:`ggn_layer_traces`). ``R`` is
the Hessian of ``r(theta) = (1/N) sum_n <g_n, z_n(theta)>`` with the logit gradients ``g_n``
held fixed, so ``tr(R_bb)`` is Hutchinson on ``r``'s pruned per-layer function: one
Hessian-vector product per probe, as in :func:`layer_traces`, but on the remainder only.
The Gauss-Newton trace acts as a control variate: the probes' variance is that of ``R_bb``
(``2 ||R_bb||_F^2`` for Rademacher probes, Avron & Toledo 2011) instead of ``H_bb``'s.

When the logits are piecewise linear in each single layer's weights -- ReLU, max pooling,
residual additions and BatchNorm in inference mode, i.e. the ResNets and VGGs of the HAWQ
papers -- ``d^2 z / dtheta_b^2 = 0`` almost everywhere, so ``R_bb = 0`` and every probe
returns 0: the diagonal blocks of the Hessian *are* the Gauss-Newton blocks, and the layer
stops after ``min_probes`` probes with standard error 0. With smooth nonlinearities (GELU,
tanh, softmax attention, LayerNorm) ``R_bb`` is not 0 and is probed until the standard
error falls below ``rtol`` times the whole trace ``tr(G_bb) + tr(R_bb)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from hqjax.curvature._checks import raise_if_not_finite
from hqjax.curvature.layer_trace import _check_probing, _one_layer, block_function
from hqjax.curvature.proxies import _setup, ggn_layer_traces
from hqjax.curvature.results import LayerTraceResult

__all__ = ["hessian_layer_traces"]

PyTree = Any


def _remainder_function(model_fn, params, x, y, w):
    """``r(p) = sum_n w_n <g_n, z_n(p)> / sum(w)`` with ``g_n = softmax(z_n) - onehot(y_n)``
    fixed at ``params``: its Hessian is ``R``, the part of the cross-entropy Hessian that
    the Gauss-Newton matrix leaves out."""
    logits = model_fn(params, x)
    probs = jax.nn.softmax(logits.astype(jnp.result_type(float)))
    g = (probs - jax.nn.one_hot(y, logits.shape[-1], dtype=probs.dtype)) * (w / jnp.sum(w))[:, None]
    g = jax.lax.stop_gradient(g)
    return lambda p: jnp.sum(g * model_fn(p, x).astype(g.dtype))


def hessian_layer_traces(model_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, x: Any, y: Any,
                         key: jax.Array, *, blocks=None, names: Sequence[str] | None = None, mask: Any = None,
                         rtol: float = 0.05, min_probes: int = 4, max_probes: int = 200, chunk_size: int | None = None,
                         backward_chunk: int | None = None,
                         dist: str = "rademacher", loop: str = "auto", ggn: LayerTraceResult | None = None,
                         progress: Callable[[str, int, float, float], None] | None = None) -> LayerTraceResult:
    """Every layer's trace of the mean softmax cross-entropy's Hessian, ``tr(H_bb)``, as the
    exact Gauss-Newton trace plus a Hutchinson estimate of the remainder (module docstring).

    Unbiased for ``tr(H_bb)`` like :func:`layer_traces`, with the Gauss-Newton part free of
    probe noise: on piecewise-linear networks (ReLU CNNs and ResNets) the result is exact
    after ``min_probes`` probes per layer.

    Parameters
    ----------
    model_fn : ``model_fn(params, x) -> logits [batch, classes]``, examples independent
        (BatchNorm in inference mode), as for :func:`ggn_layer_traces`.
    params : the point at which the Hessian is taken.
    x, y : inputs (leading batch axis) and integer labels ``[batch]``; the loss is the mean
        cross-entropy over them (over the flagged ones with ``mask``).
    key : PRNG key; layer ``b`` draws probe ``j`` from ``fold_in(fold_in(key, b), j)``.
    blocks, names : the layer partition (default ``hqjax.blocks(params)``) and the layers to
        compute (default all).
    mask : optional ``[batch]`` 0/1 flags (padding).
    rtol : stop a layer once the remainder's standard error is at most ``rtol`` times the
        layer's whole trace.
    min_probes, max_probes : probes on the remainder per layer, at least and at most.
    chunk_size, backward_chunk : how the Gauss-Newton pass batches (:func:`ggn_layer_traces`).
    dist, loop, progress : as for :func:`layer_traces`.
    ggn : the Gauss-Newton part, :func:`ggn_layer_traces` of the same ``model_fn``, ``params``
        and examples, if already computed (e.g. by a job resuming layer by layer); computed
        here otherwise.

    Returns
    -------
    LayerTraceResult with ``method='gauss_newton_split'``, ``curvature='hessian'``;
    ``num_probes`` counts the remainder's probes and ``stderr`` is theirs (the Gauss-Newton
    part is exact for these examples).
    """
    _check_probing(dist=dist, rtol=rtol, min_probes=min_probes, max_probes=max_probes, chunk_size=1)
    blk, n, w, loop, _, chunk_size = _setup(model_fn, params, x, blocks, mask, chunk_size, loop, key)
    y = jnp.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y has shape {y.shape}; expected ({n},) integer labels")
    names = tuple(blk.names if names is None else names)
    for name in names:
        blk.index(name)  # KeyError naming the valid blocks
    if ggn is None:
        ggn = ggn_layer_traces(model_fn, params, x, blocks=blk, mask=mask, chunk_size=chunk_size,
                               backward_chunk=backward_chunk, loop=loop)
    elif ggn.curvature != "ggn" or tuple(ggn.block_names) != tuple(blk.names):
        raise ValueError("ggn must be ggn_layer_traces(...) over the same blocks (all of them, in order)")
    r = _remainder_function(model_fn, params, x, y, w)

    ns, means, ses, exact = [], [], [], []
    for name in names:
        b = blk.index(name)
        f_b, theta = block_function(r, params, blk, name)
        cnt, mean, se = _one_layer(f_b, theta, jax.random.fold_in(key, b), rtol=float(rtol),
                                   min_probes=int(min_probes), max_probes=int(max_probes), chunk_size=1, dist=dist,
                                   loop=loop, linearize=False, offset=ggn.traces[b])
        ns.append(cnt), means.append(mean), ses.append(se), exact.append(ggn.traces[b])
        if progress is not None and loop == "host":
            progress(name, int(cnt), float(exact[-1] + mean), float(se))
    res = LayerTraceResult(jnp.stack(exact) + jnp.stack(means), jnp.stack(ses), jnp.stack(ns).astype(jnp.int32),
                           names, "gauss_newton_split", "hessian")
    raise_if_not_finite(res.traces, what="per-layer Hessian trace")
    return res
