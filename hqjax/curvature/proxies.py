"""Per-layer traces of Hessian proxies with no probe noise: Gauss-Newton and Fisher.

For a softmax cross-entropy loss averaged over ``N`` examples, the generalized Gauss-Newton
matrix (Schraudolph 2002) is ``G = (1/N) sum_n J_n^T H_n J_n`` with ``J_n`` the Jacobian of
example ``n``'s logits and ``H_n = diag(p_n) - p_n p_n^T`` the Hessian of the loss in the
logits. ``H_n = S_n S_n^T`` with columns ``s_c = sqrt(p_c) (e_c - p_n)``, so

    tr(G_bb) = (1/N) sum_n sum_c p_{n,c} ||g_{n,b}(c)||^2,

where ``g_n(c) = J_n^T (p_n - e_c)`` is the gradient of example ``n``'s loss had its label
been ``c``, restricted to layer ``b``. That is the exact (expected) Fisher information of the
model's predictive distribution (Martens 2020, Sec. 9.2), computed here with one forward
and ``C`` backward passes per example, every layer at once. Two cheaper relatives:

- the **empirical Fisher** uses the true label only: ``(1/N) sum_n ||g_{n,b}(y_n)||^2``
  (one backward per example; Kunstner et al. 2019 on where it departs from the Fisher);
- the **Monte-Carlo Fisher** samples ``c ~ p_n`` (``num_samples`` per example): an unbiased
  estimate of the Gauss-Newton trace with ``num_samples`` backward passes per example.

All three are per-example computations. With the device loop (accelerators, or under
``jit``) they are batched with ``vmap`` over chunks of examples and over each example's
backward passes. With the host loop (XLA:CPU) they run one example per jitted step and its
backward passes one after another: a batched backward pass turns every weight gradient into
a grouped convolution (a depthwise one into ``groups x batch`` groups), which XLA:CPU runs
far slower than the same passes one at a time (``benchmarks/hawq_task.py``). They
are generic over the user's ``model_fn(params, x) -> logits``; the model must treat examples
independently (BatchNorm in inference mode), as a per-example gradient requires.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from hqjax.curvature._checks import raise_if_not_finite
from hqjax.curvature._loop import map_chunks, resolve_loop
from hqjax.curvature.results import LayerTraceResult
from hqjax.tree import Blocks, blocks as make_blocks

__all__ = ["ggn_layer_traces", "empirical_fisher_layer_traces", "fisher_layer_traces"]

PyTree = Any


_MAX_UNROLLED = 16  # backward passes per example traced one after another, at most


def _setup(model_fn, params, x, blocks, mask, chunk_size, loop, key=None):
    """``(blocks, n, weights, loop, classes, chunk_size)``, inputs checked; ``chunk_size=None``
    resolves to 1 with the host loop and 16 with the device loop."""
    if not jax.tree.leaves(params):
        raise ValueError("params has no leaves: there is nothing to take the curvature of")
    blk = make_blocks(params) if blocks is None else blocks
    if blk.treedef != jax.tree.structure(params):
        raise ValueError("blocks were built for a different params structure; build them with hqjax.blocks(params)")
    n = int(jax.tree.leaves(x)[0].shape[0])
    if n == 0:
        raise ValueError("no examples: x has a leading (batch) axis of size 0")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
    out = jax.eval_shape(lambda p, xb: model_fn(p, xb), params, jax.tree.map(lambda a: a[:1], x))
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise ValueError(f"model_fn(params, x) must return logits [batch, classes]; for a batch of 1 it gave {out.shape}")
    w = jnp.ones((n,), jnp.result_type(float)) if mask is None else jnp.asarray(mask, jnp.result_type(float))
    if w.shape != (n,):
        raise ValueError(f"mask has shape {w.shape}; expected ({n},), one flag per example")
    loop = resolve_loop(loop, params, x) if key is None else resolve_loop(loop, params, x, key)
    if chunk_size is None:
        chunk_size = 1 if loop == "host" else 16
    return blk, n, w, loop, int(out.shape[1]), int(chunk_size)


def _rows(sq: Callable, cots: jax.Array, per_step: int | None, loop: str) -> jax.Array:
    """``sq`` of each row of ``cots [K, C]``, stacked ``[K, nb]``: ``per_step`` rows per
    ``vmap``, the steps traced one after another. ``None``: all rows in one ``vmap`` with the
    device loop; with the host loop, at most ``_MAX_UNROLLED`` steps (module docstring)."""
    k = int(cots.shape[0])
    if per_step is None:
        per_step = k if loop != "host" else -(-k // _MAX_UNROLLED)
    if int(per_step) < 1:
        raise ValueError(f"backward_chunk must be >= 1 (or None), got {per_step}")
    per = min(int(per_step), k)
    return jnp.concatenate([jax.vmap(sq)(cots[i : i + per]) if per > 1 else sq(cots[i])[None]
                            for i in range(0, k, per)])


def _example_grads(model_fn, params, blk: Blocks, xn):
    """``(p, sq)`` for one example: softmax probabilities ``[C]`` and a function ``cot -> [nb]``
    giving the per-block squared norms of ``J^T cot``."""
    logits, vjp = jax.vjp(lambda p: model_fn(p, jax.tree.map(lambda a: a[None], xn))[0], params)
    probs = jax.nn.softmax(logits.astype(jnp.result_type(float)))

    def sq(cot):
        g = vjp(cot.astype(logits.dtype))[0]
        return blk.dots(g, g)

    return probs, sq


def _finish(per_example, w, blk, names_n, method, curvature, stderr=None):
    vals = jnp.sum(w[:, None] * per_example, 0) / jnp.sum(w)
    se = jnp.zeros_like(vals) if stderr is None else stderr
    res = LayerTraceResult(vals, se, jnp.full((len(blk),), names_n, jnp.int32), tuple(blk.names), method, curvature)
    raise_if_not_finite(res.traces, what=f"{curvature} per-layer trace")
    return res


def ggn_layer_traces(model_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, x: Any, *,
                     blocks: Blocks | None = None, mask: Any = None, chunk_size: int | None = None,
                     backward_chunk: int | None = None, loop: str = "auto") -> LayerTraceResult:
    """Exact per-layer traces of the Gauss-Newton matrix of the mean softmax cross-entropy.

    Parameters
    ----------
    model_fn : ``model_fn(params, x) -> logits [batch, classes]``, examples independent.
    params : the point of evaluation.
    x : the inputs (a pytree whose leaves share the leading batch axis). The labels do not
        enter: the Gauss-Newton matrix of cross-entropy depends on the predictions only.
    blocks : the layer partition; default ``hqjax.blocks(params)``.
    mask : optional ``[batch]`` 0/1 flags; the mean runs over flagged examples (padding).
    chunk_size : examples per ``vmap`` step (memory grows with ``chunk_size * classes``);
        default 1 with the host loop, 16 with the device loop.
    backward_chunk : an example's backward passes (one per class) per ``vmap`` step, the
        steps traced one after another; default all of them with the device loop, and with
        the host loop as many as leave at most 16 steps (module docstring).
    loop : ``'host'``, ``'device'`` or ``'auto'`` (host on CPU outside ``jit``).

    Returns
    -------
    LayerTraceResult with ``stderr`` 0 (exact for these examples), ``num_probes`` the number
    of examples, ``method='exact'``, ``curvature='ggn'``.
    """
    blk, n, w, loop, C, chunk_size = _setup(model_fn, params, x, blocks, mask, chunk_size, loop)

    def one(xn):
        probs, sq = _example_grads(model_fn, params, blk, xn)
        per_class = _rows(sq, probs[None, :] - jnp.eye(C, dtype=probs.dtype), backward_chunk, loop)  # [C, nb]
        return probs @ per_class

    per_example = map_chunks(one, x, chunk_size, loop)
    return _finish(per_example, w, blk, n, "exact", "ggn")


def empirical_fisher_layer_traces(model_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, x: Any, y: Any, *,
                                  blocks: Blocks | None = None, mask: Any = None, chunk_size: int | None = None,
                                  loop: str = "auto") -> LayerTraceResult:
    """Per-layer traces of the empirical Fisher ``(1/N) sum_n g_n g_n^T``, ``g_n`` the gradient
    of example ``n``'s cross-entropy with its true label: ``(1/N) sum_n ||g_{n,b}||^2``.

    Parameters are those of :func:`ggn_layer_traces`, plus ``y``: integer labels ``[batch]``.
    Returns ``method='per_example'``, ``curvature='empirical_fisher'``, ``stderr`` 0.
    """
    blk, n, w, loop, C, chunk_size = _setup(model_fn, params, x, blocks, mask, chunk_size, loop)
    y = jnp.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y has shape {y.shape}; expected ({n},) integer labels")

    def one(xy):
        xn, yn = xy
        probs, sq = _example_grads(model_fn, params, blk, xn)
        return sq(probs - jax.nn.one_hot(yn, C, dtype=probs.dtype))

    per_example = map_chunks(one, (x, y), chunk_size, loop)
    return _finish(per_example, w, blk, n, "per_example", "empirical_fisher")


def fisher_layer_traces(model_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, x: Any, key: jax.Array, *,
                        num_samples: int = 1, blocks: Blocks | None = None, mask: Any = None, chunk_size: int | None = None,
                        backward_chunk: int | None = None, loop: str = "auto") -> LayerTraceResult:
    """Monte-Carlo Fisher: per-layer traces with labels sampled from the model, ``c ~ p_n``.

    An unbiased estimate of :func:`ggn_layer_traces` at ``num_samples`` backward passes per
    example instead of one per class.

    Parameters are those of :func:`ggn_layer_traces` (``backward_chunk`` counts the sampled
    labels' backward passes), plus ``key`` (example ``n`` samples from ``fold_in(key, n)``)
    and ``num_samples`` labels per example.

    Returns
    -------
    LayerTraceResult, ``method='monte_carlo'``, ``curvature='fisher'``. ``stderr`` is the
    label-sampling error: from the spread over each example's samples when
    ``num_samples >= 2``; with one sample, the spread over examples, which also contains the
    between-example spread and so overstates the error.
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    S = int(num_samples)
    blk, n, w, loop, C, chunk_size = _setup(model_fn, params, x, blocks, mask, chunk_size, loop, key)

    def one(xi):
        xn, i = xi
        probs, sq = _example_grads(model_fn, params, blk, xn)
        labels = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(probs), shape=(S,))
        vals = _rows(sq, probs[None, :] - jax.nn.one_hot(labels, C, dtype=probs.dtype), backward_chunk, loop)
        return jnp.stack([vals.mean(0), vals.var(0, ddof=1) if S > 1 else jnp.zeros(vals.shape[1:], vals.dtype)])

    out = map_chunks(one, (x, jnp.arange(n)), chunk_size, loop)  # [n, 2, nb]
    means, within = out[:, 0], out[:, 1]
    nw = jnp.sum(w)
    if S > 1:
        se = jnp.sqrt(jnp.sum(w[:, None] * within, 0) / S) / nw
    else:
        mu = jnp.sum(w[:, None] * means, 0) / nw
        se = jnp.sqrt(jnp.sum(w[:, None] * (means - mu) ** 2, 0) / jnp.maximum(nw - 1, 1) / nw)
    return _finish(means, w, blk, n * S, "monte_carlo", "fisher", stderr=se)
