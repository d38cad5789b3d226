"""Every layer's trace from one set of full-model probes, with the top eigenvectors deflated.

One-pass per-block Hutchinson (:func:`hqjax.trace`) estimates ``tr(M_bb)`` by
``g_b . (M g)_b``; its variance carries all cross-layer terms ``g_b . M_bc g_c``, and on a
network whose layers are coupled through a few dominant curvature directions those terms
swamp the signal. Split ``M`` along an orthonormal basis ``Q`` (``P = Q Q^T``,
``P_perp = I - P``)::

    M = (P M + M P - P M P) + P_perp M P_perp

The first part's diagonal is known exactly from ``M Q`` (``k`` matvecs)::

    diag(P M + M P - P M P) = 2 rowsum(Q * (M Q)) - rowsum((Q T) * Q),   T = Q^T M Q,

so each layer's share of it is a sum over the layer's rows. Only the second part is
probed: ``g_b . (P_perp M P_perp g)_b`` has mean ``tr((P_perp M P_perp)_bb)`` and no
contribution from the deflated directions. With ``Q`` the top Lanczos Ritz vectors this is
the per-block analogue of Hutch++ (Meyer et al. 2021) and of XDiag's exact low-rank
diagonal (Epperly et al. 2024); the estimate is unbiased for any ``Q``, and its variance is
small when ``M`` is dominated by the deflated directions.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hqjax.curvature._stats import stderr, welford_merge
from hqjax.curvature._checks import check_matvec, raise_if_not_finite
from hqjax.curvature._loop import make_while, map_chunks, resolve_loop
from hqjax.curvature.eigen import top_eigenvalues
from hqjax.curvature.results import LayerTraceResult
from hqjax.tree import Blocks, blocks as make_blocks, flat_operator, tree_random_like

__all__ = ["deflated_layer_traces"]

PyTree = Any


def _segments(shape, owner, nb: int, dtype) -> jax.Array:
    """Each entry's block index (``nb``: in no block) for a leaf of ``shape``."""
    if isinstance(owner, tuple):  # a stacked leaf: one block per index along axis 0
        return jnp.broadcast_to(jnp.asarray(owner, dtype).reshape((-1,) + (1,) * (len(shape) - 1)), shape)
    return jnp.full(shape, owner if owner >= 0 else nb, dtype)


def deflated_layer_traces(matvec: Callable[[PyTree], PyTree], params: PyTree, key: jax.Array, *, k: int = 10,
                          lanczos_steps: int = 40, eig_tol: float = 1e-3, rtol: float = 0.05, min_probes: int = 10,
                          max_probes: int = 200, blocks: Blocks | None = None, chunk_size: int = 1,
                          dist: str = "rademacher", loop: str = "auto", curvature: str = "hessian"
                          ) -> LayerTraceResult:
    """Per-layer traces ``tr(M_bb)`` of any operator, all layers from the same probes, top-``k``
    eigendirections deflated (exact) and only the remainder probed.

    Parameters
    ----------
    matvec : symmetric operator ``v -> M v`` over pytrees shaped like ``params`` (e.g.
        ``hqjax.hessian(f, params)``).
    params : pytree giving the shapes.
    key : PRNG key (split between Lanczos and the probes).
    k : deflated eigendirections (top ``k`` by magnitude, Lanczos Ritz vectors). ``0`` gives
        plain one-pass Hutchinson per block.
    lanczos_steps, eig_tol : Lanczos steps at most, and the relative residual at which it stops.
    rtol : stop once every layer's standard error is at most ``rtol`` times its trace (after
        ``min_probes``), or at ``max_probes``.
    blocks : the layer partition; default ``hqjax.blocks(params)``.
    chunk_size, dist, loop : as in :func:`hqjax.trace`.
    curvature : what ``matvec`` is, recorded in the result (``'hessian'``, ``'ggn'``, ...).

    Returns
    -------
    LayerTraceResult, ``method='deflated'``; ``stderr`` is the probes' standard error (the
    deflated part is exact given ``Q``); ``num_probes`` the probe count (the same for every
    layer; ``k`` more matvecs and the Lanczos steps come on top).
    """
    if int(k) < 0 or int(lanczos_steps) < int(k):
        raise ValueError(f"need 0 <= k <= lanczos_steps; got k={k}, lanczos_steps={lanczos_steps}")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")
    if int(max_probes) < 2 or int(min_probes) < 2 or int(min_probes) > int(max_probes):
        raise ValueError(f"need 2 <= min_probes <= max_probes; got min_probes={min_probes}, max_probes={max_probes}")
    check_matvec(matvec, params)
    blk = make_blocks(params) if blocks is None else blocks
    if blk.treedef != jax.tree.structure(params):
        raise ValueError("blocks were built for a different params structure; build them with hqjax.blocks(params)")
    loop = resolve_loop(loop, params, key)
    chunk_size = max(1, min(int(chunk_size), int(max_probes)))
    nb = len(blk)
    flat_mv, ravel, unravel = flat_operator(matvec, params)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    # Each flat entry's block (nb for leaves in no block), in ravel's order.
    seg = ravel(jax.tree.unflatten(blk.treedef, [_segments(jnp.shape(x), b, nb, dtype)
                                                 for x, b in zip(jax.tree.leaves(params), blk.leaf_block)]))
    seg = seg.astype(jnp.int32)
    per_block = lambda d: jax.ops.segment_sum(d, seg, nb + 1)[:nb]
    k_eig, k_probe = jax.random.split(key)

    if int(k) > 0:
        eig = top_eigenvalues(matvec, params, k_eig, k=int(k), method="lanczos", max_iters=int(lanczos_steps),
                              tol=eig_tol, loop=loop)
        Q = jax.vmap(ravel)(eig.eigenvectors)  # [k, n]
        # Ritz vectors are orthonormal to working precision; one QR keeps P_perp a projector.
        Q = jnp.linalg.qr(Q.T)[0].T
        MQ = map_chunks(flat_mv, Q, chunk_size, loop)  # [k, n]
        T = Q @ MQ.T
        T = (T + T.T) / 2
        exact = per_block(2 * jnp.sum(Q * MQ, 0) - jnp.sum((T @ Q) * Q, 0))
        project = lambda x: x - Q.T @ (Q @ x)
    else:
        exact = jnp.zeros((nb,), dtype)
        project = lambda x: x

    def quad(j):
        g = ravel(tree_random_like(jax.random.fold_in(k_probe, j), params, dist))
        cg = project(flat_mv(project(g)))
        return per_block(g * cg)

    num_chunks = -(-int(max_probes) // int(chunk_size))

    def body(s):
        c, n, mean, m2, limits = s
        js = c * chunk_size + jnp.arange(chunk_size)
        vals = jax.vmap(quad)(js) if chunk_size > 1 else quad(js[0])[None]
        n, mean, m2 = welford_merge((n, mean, m2), vals.astype(mean.dtype), (js < limits[1]).astype(mean.dtype))
        return c + 1, n, mean, m2, limits

    def cond(s):
        c, n, mean, m2, limits = s
        se = stderr(n, m2)
        converged = (n >= limits[2]) & jnp.all(se <= limits[3] * jnp.abs(mean + exact))
        return (c < limits[0]) & jnp.logical_not(converged)

    f = jnp.result_type(float)
    limits = jnp.asarray([num_chunks, int(max_probes), int(min_probes), rtol], f)
    init = (jnp.int32(0), jnp.zeros((), f), jnp.zeros((nb,), f), jnp.zeros((nb,), f), limits)
    _, n, mean, m2, _ = make_while(cond, body, init, loop)(init)
    se = stderr(n, m2)
    res = LayerTraceResult(exact + mean, se, jnp.full((nb,), n, jnp.int32), tuple(blk.names), "deflated",
                           curvature)
    raise_if_not_finite(res.traces, what="deflated per-layer trace estimate")
    return res
