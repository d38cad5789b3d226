"""Top eigenvalues of a symmetric operator: power iteration with deflation, and Lanczos.

Power iteration with deflation is PyHessian's ``eigenvalues`` (Yao et al. 2020, Alg. 2;
HAWQ, Dong et al. 2019, Sec. 3.1): iterate ``v <- M v / ||M v||`` orthogonal to the
eigenvectors already found, stop when the Rayleigh quotient changes by less than ``tol``
relative (defaults: 100 iterations, 1e-3). It converges to the eigenvalue of largest
magnitude at rate ``|lambda_2 / lambda_1|``. Lanczos (with full reorthogonalization) finds
the same extreme eigenvalues from one Krylov space, in far fewer matvecs for the same
accuracy (Saad 2011, Ch. 6); here it stops once the top-k Ritz residual bounds
``|beta_j s_{j,i}|`` fall below ``tol |theta_i|``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hqjax.curvature._checks import check_matvec, raise_if_not_finite
from hqjax.curvature._loop import make_while, resolve_loop
from hqjax.curvature.lanczos import check_reorth_passes, lanczos_runner, stack_basis, tridiagonal
from hqjax.curvature.results import EigenResult
from hqjax.tree import Blocks, flat_operator, tree_size

__all__ = ["top_eigenvalues", "block_top_eigenvalues"]

PyTree = Any
logger = logging.getLogger("hqjax")


def _unit(v):
    return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(v.dtype).tiny)


def _power(flat_mv, n, dtype, key, k, max_iters, tol, loop):
    """All k deflated power iterations as one loop, so the step is compiled once."""

    def start(i):
        v = jax.random.normal(jax.random.fold_in(key, i), (n,), dtype)
        return v / jnp.linalg.norm(v)

    def record(i, it, lam, v_new, conv, vals, vecs, iters, convs):
        u = v_new - (vecs @ v_new) @ vecs
        u = u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(dtype).tiny)
        return vals.at[i].set(lam), vecs.at[i].set(u), iters.at[i].set(it), convs.at[i].set(conv), start(i + 1)

    def keep(i, it, lam, v_new, conv, vals, vecs, iters, convs):
        return vals, vecs, iters, convs, v_new

    def body(s):
        i, it, v, prev, vals, vecs, iters, convs, (max_iters, tol) = s
        # PyHessian's orthnormal(v, eigenvectors): deflation. Skipped (v is already a unit
        # vector) while no eigenvector is known: four passes over n, more than the rest of
        # the step's own work on large models.
        v = jax.lax.cond(i > 0, lambda v: _unit(v - (vecs @ v) @ vecs), lambda v: v, v)
        w = flat_mv(v)
        lam = jnp.vdot(w, v)
        v_new = w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(dtype).tiny)
        it = it + 1
        conv = (it > 1) & (jnp.abs(lam - prev) / (jnp.abs(prev) + 1e-6) < tol)
        done = conv | (it >= max_iters)
        # The reported vector is the normalized last iterate, as in PyHessian. cond, not
        # where: selecting between whole [k, n] eigenvector arrays every iteration cost more
        # than a small model's matvec.
        vals, vecs, iters, convs, v_next = jax.lax.cond(done, record, keep, i, it, lam, v_new, conv, vals, vecs,
                                                        iters, convs)
        return (jnp.where(done, i + 1, i), jnp.where(done, 0, it), v_next, jnp.where(done, 0.0, lam), vals, vecs,
                iters, convs, (max_iters, tol))

    # max_iters and tol travel in the state so one compiled step serves every setting.
    init = (jnp.int32(0), jnp.int32(0), start(0), jnp.zeros((), dtype), jnp.zeros((k,), dtype),
            jnp.zeros((k, n), dtype), jnp.zeros((k,), jnp.int32), jnp.zeros((k,), bool),
            (jnp.int32(max_iters), jnp.asarray(tol, dtype)))
    _, _, _, _, vals, vecs, iters, convs, _ = make_while(lambda s: s[0] < k, body, init, loop)(init)
    # Deflation finds the eigenvalues in the order the iteration reaches them, which is not
    # always decreasing magnitude (a slowly converging pair can swap): sort, as promised.
    order = jnp.argsort(-jnp.abs(vals), stable=True)
    return vals[order], vecs[order], iters[order], convs[order]


def _top_ritz(alphas, betas, j, k):
    """Top-k (by magnitude) Ritz values of the active ``T[:j, :j]``, eigenvectors and residual bounds."""
    m = alphas.shape[0]
    active = jnp.arange(m) < j
    theta, S = jnp.linalg.eigh(tridiagonal(alphas, betas * active))
    # Eigenvalues of the inactive (zero) padding have eigenvectors supported there: exclude them.
    support = jnp.sum(S**2 * active[:, None], 0) > 0.5
    order = jnp.argsort(jnp.where(support, -jnp.abs(theta), jnp.inf))[:k]
    last = jnp.take(S, jnp.maximum(j - 1, 0), axis=0)
    bounds = jnp.abs(betas[jnp.maximum(j - 1, 0)] * last)
    return theta[order], S[:, order], bounds[order]


def _lanczos(flat_mv, n, dtype, key, k, max_iters, tol, loop, reorth_passes, orthogonalize):
    m = min(int(max_iters), n)
    m = max(m, k)

    def stop(alphas, betas, j):
        theta, _, bounds = _top_ritz(alphas, betas, j + 1, k)
        return (j + 1 >= k) & jnp.all(bounds <= tol * jnp.abs(theta))

    kv, kb = jax.random.split(key)
    v0 = jax.random.normal(kv, (n,), dtype)
    alphas, betas, V, j = lanczos_runner(flat_mv, m, v0, loop, kb, stop, reorth_passes, orthogonalize)(v0)
    theta, S, bounds = _top_ritz(alphas, betas, j, k)
    vecs = S.T @ stack_basis(V, m)  # Ritz vectors [k, n]
    return theta, vecs, jnp.full((k,), j, jnp.int32), bounds <= tol * jnp.abs(theta)


def top_eigenvalues(matvec: Callable[[PyTree], PyTree], params: PyTree, key: jax.Array, *, k: int = 1,
                    method: str = "power", max_iters: int = 100, tol: float = 1e-3,
                    loop: str = "auto", reorth_passes: int = 2, orthogonalize=None) -> EigenResult:
    """The ``k`` eigenvalues of largest magnitude of a symmetric operator, with eigenvectors.

    Parameters
    ----------
    matvec : symmetric operator ``v -> M v`` over pytrees shaped like ``params``.
    params : pytree giving the shapes.
    key : PRNG key (the same key gives the same result).
    k : number of eigenpairs.
    method : ``'power'`` (PyHessian: deflated power iteration, up to ``max_iters`` matvecs
        per eigenpair, relative tolerance ``tol`` on the Rayleigh quotient) or ``'lanczos'``
        (one Krylov space of at most ``max_iters`` steps, stopped when every top-k Ritz pair
        has residual bound below ``tol`` relative; use e.g. ``tol=1e-6`` for eigenvalues
        accurate to ~1e-6 relative or better).
    max_iters, tol : see ``method``; defaults are PyHessian's.
    loop : ``'auto'``, ``'device'`` or ``'host'`` (see ``hqjax.trace``).
    reorth_passes : Gram-Schmidt passes per Lanczos step (1 or 2; ``method='lanczos'`` only).
    orthogonalize : ``(w, V, j, passes) -> w``, the reorthogonalization of a Lanczos step
        (``method='lanczos'`` only); default :func:`hqjax.curvature.lanczos.gram_schmidt`.

    Returns
    -------
    EigenResult with ``eigenvalues [k]`` sorted by decreasing magnitude, ``eigenvectors``
    (params pytree with leading axis ``k``), ``num_iters`` and ``converged [k]`` (power: the
    Rayleigh quotient met ``tol`` before ``max_iters``; Lanczos: the Ritz residual bound met
    it). Outside ``jit``, unconverged eigenvalues are also reported on the ``hqjax`` logger.
    """
    if method not in ("power", "lanczos"):
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    n = tree_size(params)
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must be between 1 and the number of parameters ({n}), got {k}")
    if int(max_iters) < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    passes = check_reorth_passes(reorth_passes)
    check_matvec(matvec, params)
    loop = resolve_loop(loop, params, key)
    flat_mv, _, unravel = flat_operator(matvec, params)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    if method == "power":
        vals, vecs, iters, conv = _power(flat_mv, n, dtype, key, int(k), int(max_iters), tol, loop)
    else:
        vals, vecs, iters, conv = _lanczos(flat_mv, n, dtype, key, int(k), int(max_iters), tol, loop, passes,
                                           orthogonalize)
    res = EigenResult(vals, jax.vmap(unravel)(vecs), iters, method, conv)
    raise_if_not_finite(res.eigenvalues, what="top eigenvalue estimate")
    if not isinstance(conv, jax.core.Tracer) and not bool(jnp.all(conv)):  # under jit the flag says it
        logger.warning("top_eigenvalues (%s): %d of %d eigenvalues did not reach tol=%g within max_iters=%d; "
                       "raise max_iters or tol (EigenResult.converged says which)", method,
                       int(k) - int(jnp.sum(conv)), int(k), tol, int(max_iters))
    return res


def block_top_eigenvalues(matvec: Callable[[PyTree], PyTree], params: PyTree, key: jax.Array, blocks: Blocks,
                          *, k: int = 1, **kwargs) -> dict[str, EigenResult]:
    """Top eigenpairs of each diagonal block ``M_bb`` (HAWQ, Dong et al. 2019: per-layer top eigenvalue).

    The operator is restricted with ``blocks.restrict_operator``; block ``i`` uses
    ``fold_in(key, i)``. Other keyword arguments go to ``top_eigenvalues``. Eigenvectors are
    full params-shaped pytrees, zero outside the block.
    """
    if blocks.treedef != jax.tree.structure(params):
        raise ValueError("blocks were built for a different params structure; build them with hqjax.blocks(params)")
    out = {}
    for i, name in enumerate(blocks.names):
        kk = min(int(k), blocks.sizes[i])
        out[name] = top_eigenvalues(blocks.restrict_operator(matvec, name), params, jax.random.fold_in(key, i),
                                    k=kk, **kwargs)
    return out
