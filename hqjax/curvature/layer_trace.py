"""Per-layer Hessian traces, each layer probed on its own, to a target relative error.

HAWQ-V2 (Dong et al. 2020, Eq. 4) needs ``tr(H_bb)`` for every layer ``b``. The one-pass
estimate of :func:`hqjax.trace` reads ``v_b . (H v)_b`` from full-model probes; its mean is
``tr(H_bb)`` but its variance carries every cross-layer term ``v_b . H_bc v_c``, which on a
coupled network (a CNN, a ResNet) dominates: relative standard errors of tens to hundreds
of percent per layer at a few dozen probes (measured on ResNet-20; see
``benchmarks/hawq_task.py``). Here each layer gets its own Rademacher probes ``v_b`` on the *pruned* per-layer
function ``f_b(theta_b) = f(params with block b replaced by theta_b)``: its Hessian is
exactly ``H_bb``, so the Hutchinson variance is that of ``H_bb`` alone
(``2 ||H_bb||_F^2 - 2 sum diag(H_bb)^2``, Avron & Toledo 2011), and autodiff computes the
product without differentiating the layers below ``b`` (as PyHessian's per-layer loop does
by letting only that layer's weight require a gradient).

Probing stops per layer once the standard error of the running mean falls below
``rtol * |mean|`` (after at least ``min_probes``), or at ``max_probes``.

Compilation: each layer's step is a different program (the layer sits at a different
depth, so XLA prunes a different part of the graph); it is compiled once per layer and
cached by program text, so a second call on the same model and shapes (new weights, new
key) compiles nothing. Layers of equal shapes at different depths cannot share a pruned
program: sharing would need a dynamic layer index, which forces the backward pass through
every candidate layer and gives up the pruning that makes the method cheap.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from hqjax.curvature._stats import stderr, welford_merge
from hqjax.curvature._checks import raise_if_not_finite
from hqjax.curvature._loop import _hoist, make_while, resolve_loop
from hqjax.curvature.operators import is_concrete
from hqjax.curvature.results import LayerTraceResult
from hqjax.tree import Blocks, blocks as make_blocks, tree_dot, tree_random_like

__all__ = ["layer_traces", "block_function"]

PyTree = Any


def block_function(f: Callable[[PyTree], jax.Array], params: PyTree, blk: Blocks, name: str):
    """``(f_b, theta_b)``: ``f`` as a function of block ``name``'s leaves only.

    ``theta_b`` is the list of the block's leaves (in ``jax.tree.leaves`` order; a stacked
    leaf's slice); ``f_b`` puts a list shaped like it back into ``params`` and evaluates ``f``. Every other leaf is
    closed over, so derivatives of ``f_b`` touch only what depends on the block.
    """
    parts = blk.parts(name)
    leaves, treedef = jax.tree.flatten(params)

    def f_b(theta):
        full = list(leaves)
        for (i, j), t in zip(parts, theta):
            full[i] = t if j is None else full[i].at[j].set(t)
        return f(jax.tree.unflatten(treedef, full))

    return f_b, [leaves[i] if j is None else leaves[i][j] for i, j in parts]


def _check_probing(*, dist, rtol, min_probes, max_probes, chunk_size) -> None:
    if dist not in ("rademacher", "gaussian", "normal"):
        raise ValueError(f"unknown probe distribution {dist!r}: use 'rademacher' or 'gaussian'")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0 (e.g. 0.05 for 5%), got {rtol!r}")
    if int(max_probes) < 2 or int(min_probes) < 2 or int(min_probes) > int(max_probes):
        raise ValueError(f"need 2 <= min_probes <= max_probes (a standard error needs 2 probes); "
                         f"got min_probes={min_probes}, max_probes={max_probes}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")




def _linearized_hvp(f_b, theta):
    """``v -> H_bb v`` reusing one linearization of ``grad f_b`` (computed now, jitted, with
    the closed-over params as arguments so they are not baked into the program)."""
    lin = jax.linearize(jax.grad(f_b), theta)[1] if not is_concrete(theta) else None
    if lin is None:
        run = _hoist(lambda t: jax.linearize(jax.grad(f_b), t)[1], theta)
        lin = run(theta) if run is not None else jax.linearize(jax.grad(f_b), theta)[1]
    return lin


def _one_layer(f_b, theta, key, *, rtol, min_probes, max_probes, chunk_size, dist, loop, linearize, offset=0.0):
    """Adaptive Hutchinson on the pruned function; returns ``(n, mean, stderr)``.

    The stop compares the standard error with ``rtol * |offset + mean|``: ``offset`` is an
    exactly known part of the trace when the probes estimate only the remainder (the
    Gauss-Newton split of :mod:`hqjax.curvature.gn_split`)."""
    hvp = _linearized_hvp(f_b, theta) if linearize else (lambda v: jax.jvp(jax.grad(f_b), (theta,), (v,))[1])

    def quad(j):
        v = tree_random_like(jax.random.fold_in(key, j), theta, dist)
        return tree_dot(v, hvp(v))

    dtype = jnp.result_type(float)
    num_chunks = -(-max_probes // chunk_size)

    def body(s):
        c, n, mean, m2, limits = s
        js = c * chunk_size + jnp.arange(chunk_size)
        vals = jax.vmap(quad)(js) if chunk_size > 1 else quad(js[0])[None]
        n, mean, m2 = welford_merge((n, mean, m2), vals.astype(dtype), (js < limits[1]).astype(dtype))
        return c + 1, n, mean, m2, limits

    def cond(s):
        c, n, mean, m2, limits = s
        converged = (n >= limits[2]) & (stderr(n, m2) <= limits[3] * jnp.abs(limits[4] + mean))
        return (c < limits[0]) & jnp.logical_not(converged)

    # Counts and tolerance are loop state, not constants: one compiled step per layer serves
    # every rtol / probe budget.
    limits = jnp.stack([jnp.asarray(v, dtype) for v in (num_chunks, max_probes, min_probes, rtol, offset)])
    init = (jnp.int32(0), jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.zeros((), dtype), limits)
    _, n, mean, m2, _ = make_while(cond, body, init, loop)(init)
    return n, mean, stderr(n, m2)


def layer_traces(f: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array, *,
                 blocks: Blocks | None = None, names: Sequence[str] | None = None, rtol: float = 0.05,
                 min_probes: int = 10, max_probes: int = 200, chunk_size: int = 1, dist: str = "rademacher",
                 loop: str = "auto", linearize: bool = False,
                 progress: Callable[[str, int, float, float], None] | None = None) -> LayerTraceResult:
    """Every layer's Hessian trace ``tr(H_bb)``, each from its own probes, to a relative error.

    Parameters
    ----------
    f : scalar loss ``f(params)`` (e.g. ``hqjax.dataset_loss(...)`` or a closure over a batch).
    params : the point at which the Hessian is taken.
    key : PRNG key. Layer ``b`` (its index in ``blocks``) draws probe ``j`` from
        ``fold_in(fold_in(key, b), j)``, so a layer's result does not depend on which other
        layers are computed in the same call (``names``) or on ``chunk_size``.
    blocks : the layer partition; default ``hqjax.blocks(params)``.
    names : compute only these blocks (in this order); default all.
    rtol : stop a layer once its standard error is at most ``rtol * |trace|``. ``0`` runs
        exactly ``max_probes`` probes.
    min_probes : probes before the stop is considered: the standard error of very few
        probes is itself too noisy to stop on (a small sample can look converged).
    max_probes : the cap per layer; a layer that stops here reports its (larger) error.
    chunk_size : probes per step under ``vmap``. ``1`` is the CPU default: ``vmap`` turns
        weight gradients of convolutions into grouped ones, slower per probe on XLA:CPU.
    dist : ``'rademacher'`` (minimal variance) or ``'gaussian'``.
    loop : ``'host'`` (a Python loop over one jitted step per layer), ``'device'``
        (``lax.while_loop``) or ``'auto'`` (host on CPU outside ``jit``). Under ``jit`` the
        loop runs on the device and the adaptive stop still applies (both are traced).
    linearize : if True, linearize ``grad f_b`` once per layer and apply only the linear
        map per probe (the primal passes are not repeated), at the memory of the residuals
        (about twice the activations) while that layer runs. Off by default: on XLA:CPU a
        ResNet-20 layer's linearized product ran slower than forward-over-reverse (measured
        once, on a loaded machine); measure before switching it on.
    progress : optional ``progress(name, num_probes, trace, stderr)`` called after each
        layer (host side; e.g. to advance a progress bar).

    Returns
    -------
    LayerTraceResult with per-layer ``traces``, ``stderr`` and ``num_probes``.

    Notes
    -----
    Cost per probe is one product with ``H_bb``: the tangent forward pass starts at layer
    ``b`` and the backward pass stops there (with ``linearize``, nothing else is recomputed). Each layer's step
    compiles once (see the module docstring); calls are cached by program text.

    The stated standard error is the sample standard deviation over probes divided by
    ``sqrt(num_probes)``. Stopping on it slightly favours runs whose sample variance came
    out low; ``min_probes`` keeps that effect small.
    """
    _check_probing(dist=dist, rtol=rtol, min_probes=min_probes, max_probes=max_probes, chunk_size=chunk_size)
    if not jax.tree.leaves(params):
        raise ValueError("params has no leaves: there is nothing to take the curvature of")
    blk = make_blocks(params) if blocks is None else blocks
    if blk.treedef != jax.tree.structure(params):
        raise ValueError("blocks were built for a different params structure; build them with hqjax.blocks(params)")
    names = tuple(blk.names if names is None else names)
    for n in names:
        blk.index(n)  # KeyError naming the valid blocks
    loop = resolve_loop(loop, params, key)
    chunk_size = min(int(chunk_size), int(max_probes))

    ns, means, ses = [], [], []
    for name in names:
        f_b, theta = block_function(f, params, blk, name)
        n, mean, se = _one_layer(f_b, theta, jax.random.fold_in(key, blk.index(name)), rtol=float(rtol),
                                 min_probes=int(min_probes), max_probes=int(max_probes), chunk_size=chunk_size,
                                 dist=dist, loop=loop, linearize=bool(linearize))
        ns.append(n), means.append(mean), ses.append(se)
        if progress is not None and loop == "host":
            progress(name, int(n), float(mean), float(se))
    res = LayerTraceResult(jnp.stack(means), jnp.stack(ses), jnp.stack(ns).astype(jnp.int32), names,
                           "hutchinson", "hessian")
    raise_if_not_finite(res.traces, what="per-layer trace estimate")
    return res
