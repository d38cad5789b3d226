"""Stochastic trace estimation: Hutchinson and Hutch++, total and per block in one pass.

(Per-layer traces of coupled networks: see :mod:`hqjax.curvature.layer_trace`.)

For a probe ``v`` with ``E[v v^T] = I`` (Rademacher or Gaussian), ``E[v^T M v] = tr(M)``
(Hutchinson 1989) and, restricting both sides to a block ``b``, ``E[v_b . (M v)_b] = tr(M_bb)``:
one matvec per probe gives the total and every layer's trace (HAWQ-V2, Dong et al. 2020,
Eq. 4). Hutch++ (Meyer et al. 2021, Alg. 1) spends a third of the matvecs on a sketch
``Q = orth(M S)``, takes ``tr(Q^T M Q)`` exactly and Hutchinson on the deflated rest, which
lowers the variance when the spectrum is dominated by a few large eigenvalues.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from hqjax.curvature._stats import stderr, welford_merge
from hqjax.curvature._checks import check_matvec, raise_if_not_finite
from hqjax.curvature._loop import make_while, map_chunks, resolve_loop
from hqjax.curvature.results import TraceResult
from hqjax.tree import Blocks, blocks as make_blocks, flat_operator, tree_dot, tree_random_like

__all__ = ["trace"]

PyTree = Any


def _probe(key, j, params, dist):
    return tree_random_like(jax.random.fold_in(key, j), params, dist)


def _hutchinson(matvec, params, key, blk: Blocks, *, num_probes, dist, chunk_size, tol, loop,
                deflate=None):
    """Run Hutchinson probes in chunks; returns ``(n, mean [1+nb], m2 [1+nb])``.

    With ``deflate = (Q, ravel, unravel)`` (Q ``[n_params, k]`` orthonormal, in ``ravel``'s order), the matvec is applied
    to ``g_perp = (I - Q Q^T) g``; the total uses ``g_perp . M g_perp`` (Hutch++) and block
    ``b`` uses ``g_b . (M g_perp)_b``, whose mean is ``tr(M_bb) - tr(P_b Q Q^T M P_b)``.
    """
    num_chunks = -(-num_probes // chunk_size)
    nb = len(blk)

    def one(j):
        g = _probe(key, j, params, dist)
        if deflate is None:
            gp = g
        else:
            Q, ravel, unravel = deflate
            gf = ravel(g)
            gp = unravel(gf - Q @ (Q.T @ gf))
        mg = matvec(gp)
        return jnp.concatenate([tree_dot(gp, mg)[None], blk.dots(g, mg).reshape(nb)])

    def chunk_values(c, limit):
        js = c * chunk_size + jnp.arange(chunk_size)
        vals = jax.vmap(one)(js) if chunk_size > 1 else one(js[0])[None]
        return vals, (js < limit).astype(vals.dtype)

    dtype = jnp.result_type(float)
    # Counts and tolerance travel in the loop state, not as constants, so one compiled step
    # serves every num_probes / tol.
    limits = (jnp.int32(num_chunks), jnp.int32(num_probes), jnp.asarray(-1.0 if tol is None else tol, dtype))
    init = (jnp.int32(0), jnp.zeros((), dtype), jnp.zeros((nb + 1,), dtype), jnp.zeros((nb + 1,), dtype),
            jnp.zeros((), dtype), limits, jnp.bool_(False))

    def body(s):
        c, n, mean, m2, prev, limits, _ = s
        vals, w = chunk_values(c, limits[1])
        n, mean, m2 = welford_merge((n, mean, m2), vals, w)
        # PyHessian's stopping rule, on |running mean| (its signed version stops after two
        # probes when the mean is negative).
        done = (c >= 1) & (jnp.abs(mean[0] - prev) / (jnp.abs(prev) + 1e-6) < limits[2])
        return c + 1, n, mean, m2, mean[0], limits, done

    def cond(s):
        return (s[0] < s[5][0]) & jnp.logical_not(s[-1])

    _, n, mean, m2, _, _, _ = make_while(cond, body, init, loop)(init)
    return n, mean, m2



def trace(matvec: Callable[[PyTree], PyTree], params: PyTree, key: jax.Array, *, num_probes: int = 100,
          blocks: Blocks | None = None, dist: str = "rademacher", chunk_size: int = 1, tol: float | None = None,
          method: str = "hutchinson", loop: str = "auto") -> TraceResult:
    """Estimate ``tr(M)`` and every block's ``tr(M_bb)`` from the same probes.

    Parameters
    ----------
    matvec : any symmetric operator ``v -> M v`` over pytrees shaped like ``params``
        (``hqjax.hessian``, ``hqjax.ggn``, a Fisher, a researcher's own).
    params : pytree giving the shapes (its values are not used).
    key : PRNG key; probe ``j`` is drawn from ``fold_in(key, j)``, so the result does not
        depend on ``chunk_size`` or ``loop``.
    num_probes : number of probes (matvecs). For Hutch++, the total matvec budget (>= 3).
    blocks : partition for per-block traces; default ``hqjax.blocks(params)`` (one block
        per layer that owns a kernel).
    dist : ``'rademacher'`` (minimal variance, the default) or ``'gaussian'``.
    chunk_size : probes per ``vmap`` chunk: memory grows linearly with it.
    tol : PyHessian's stopping rule: stop once the running mean of the total changes by
        less than ``tol`` relative between chunks (at most ``num_probes`` probes). Hutchinson only.
    method : ``'hutchinson'`` or ``'hutch++'``.
    loop : ``'device'`` (``lax.while_loop``), ``'host'`` (a Python loop over one jitted
        chunk; faster for convolutions on XLA:CPU) or ``'auto'`` (host on CPU unless traced).

    Returns
    -------
    TraceResult with ``total``, ``total_stderr``, ``block_traces``, ``block_stderr``,
    ``num_probes`` and ``block_names``.

    Notes
    -----
    The per-block values are unbiased, but each carries every cross-layer term
    ``v_b . M_bc v_c`` in its variance, and ``block_stderr`` states it: on networks whose
    layers are coupled (CNNs, ResNets) it is often as large as the traces themselves at
    affordable probe counts, and some blocks can come out negative. For per-layer
    sensitivities use :func:`hqjax.layer_traces` (each layer probed on its own function)
    or :func:`hqjax.deflated_layer_traces`; this function is the right tool for the total.

    Works under ``jit`` (``loop`` then falls back to the device). Outside ``jit`` a
    non-finite result raises ``FloatingPointError``; under ``jit`` NaNs propagate into the
    result (wrap with ``jax.experimental.checkify`` to catch them).
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    if dist not in ("rademacher", "gaussian", "normal"):
        raise ValueError(f"unknown probe distribution {dist!r}: use 'rademacher' or 'gaussian'")
    if int(num_probes) < (3 if method == "hutch++" else 1):
        raise ValueError(f"num_probes must be >= {3 if method == 'hutch++' else 1} for {method}, got {num_probes}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if tol is not None and method != "hutchinson":
        raise ValueError("tol (a tolerance stop) is only supported with method='hutchinson'")
    check_matvec(matvec, params)
    blk = make_blocks(params) if blocks is None else blocks
    if blk.treedef != jax.tree.structure(params):
        raise ValueError("blocks were built for a different params structure; build them with hqjax.blocks(params)")
    loop = resolve_loop(loop, params, key)
    chunk_size = min(int(chunk_size), int(num_probes))

    if method == "hutchinson":
        n, mean, m2 = _hutchinson(matvec, params, key, blk, num_probes=int(num_probes), dist=dist,
                                  chunk_size=chunk_size, tol=tol, loop=loop)
        lowrank = jnp.zeros_like(mean)
    else:
        n, mean, m2, lowrank = _hutchpp(matvec, params, key, blk, int(num_probes), dist, chunk_size, loop)
    est = mean + lowrank
    se = stderr(n, m2)
    res = TraceResult(est[0], se[0], est[1:], se[1:], n.astype(jnp.int32), tuple(blk.names), method)
    raise_if_not_finite(res.total, res.block_traces, what="trace estimate")
    return res


def _hutchpp(matvec, params, key, blk, num_probes, dist, chunk_size, loop):
    """Hutch++ (Meyer et al. 2021, Alg. 1) with exact per-block low-rank parts."""
    k = num_probes // 3
    ks, kg = jax.random.split(key)
    flat_mv, ravel, unravel = flat_operator(matvec, params)
    S = jax.vmap(lambda j: ravel(_probe(ks, j, params, dist)))(jnp.arange(k))
    MS = map_chunks(flat_mv, S, chunk_size, loop)  # [k, n]
    Q, _ = jnp.linalg.qr(MS.T)  # [n, k]
    MQ = map_chunks(flat_mv, Q.T, chunk_size, loop)  # [k, n]
    lowrank_total = jnp.sum(Q.T * MQ)
    lowrank_blocks = jax.vmap(lambda q, mq: blk.dots(unravel(q), unravel(mq)).reshape(len(blk)))(Q.T, MQ).sum(0)
    n, mean, m2 = _hutchinson(matvec, params, kg, blk, num_probes=num_probes - 2 * k, dist=dist,
                              chunk_size=min(chunk_size, num_probes - 2 * k), tol=None, loop=loop,
                              deflate=(Q, ravel, unravel))
    return n, mean, m2, jnp.concatenate([lowrank_total[None], lowrank_blocks])
