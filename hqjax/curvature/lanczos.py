"""The Lanczos process with full reorthogonalization, shared by eigen and density.

Lanczos (1950) builds an orthonormal Krylov basis ``V`` and the tridiagonal ``T = V^T M V``
one matvec per step. In floating point the basis loses orthogonality as Ritz values
converge, which creates spurious copies of eigenvalues; re-orthogonalizing every new vector
against all previous ones (twice, "twice is enough", Parlett 1998 Sec. 6.9) prevents it at
``O(n m)`` memory, which is what PyHessian's SLQ does (Yao et al. 2020, Alg. 3).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hqjax.curvature._loop import make_while


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """``T`` with ``alphas`` on the diagonal and ``betas[:-1]`` off it (``betas[j]`` couples j, j+1)."""
    off = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def _orthogonalize(w, V, mask):
    """Remove from ``w`` its components along the rows of ``V`` selected by ``mask``, twice."""
    for _ in range(2):
        w = w - ((V @ w) * mask) @ V
    return w


def _normalize(w):
    """``w / ||w||`` computed on ``w / max|w|`` so tiny vectors do not underflow; 0 stays 0."""
    s = jnp.max(jnp.abs(w))
    u = w / jnp.where(s > 0, s, 1.0)
    nrm = jnp.linalg.norm(u)
    return u / jnp.where(nrm > 0, nrm, 1.0)


def lanczos_runner(flat_mv: Callable[[jax.Array], jax.Array], num_steps: int, example_v0: jax.Array, loop: str,
                   key: jax.Array, stop: Callable | None = None):
    """A function ``v0 -> (alphas [m], betas [m], V [m, n], steps)`` running ``m`` Lanczos steps.

    ``v0`` need not be normalized. On breakdown (``beta ~ 0``: the Krylov space is
    invariant, e.g. ``m`` exceeds the rank) the next basis vector is a fresh random vector
    orthogonal to ``V`` and the coupling is set to 0, so ``T`` stays exact and block-diagonal.
    ``stop(alphas, betas, j)`` (optional) ends the process early after step ``j``; the
    unused tail of ``alphas``/``betas`` is zero.
    """
    m = int(num_steps)
    n = example_v0.shape[0]
    dtype = example_v0.dtype

    def body(s):
        j, v, v_prev, beta_prev, alphas, betas, V, norm_est, _ = s
        V = V.at[j].set(v)
        mask = (jnp.arange(m) <= j).astype(dtype)
        w = flat_mv(v)
        norm_est = jnp.maximum(norm_est, jnp.linalg.norm(w))  # running lower bound on ||M||
        alpha = jnp.vdot(w, v)
        w = w - alpha * v - beta_prev * v_prev
        w = _orthogonalize(w, V, mask)
        beta = jnp.linalg.norm(w)
        # Breakdown relative to ||M||, not to this step: after the Krylov space is exhausted
        # what remains of w is rounding noise, which must not become a basis vector.
        broke = beta <= 1e-5 * norm_est

        def restart(w):
            fresh = _orthogonalize(jax.random.normal(jax.random.fold_in(key, j), (n,), dtype), V, mask)
            # A fresh vector keeps most of its norm (~sqrt(n - j)) unless the whole space is spanned.
            return jnp.where(jnp.linalg.norm(fresh) < 0.5, 0.0, fresh)

        # cond, not where: the restart costs two more passes over V, and breakdown is rare
        w = jax.lax.cond(broke, restart, lambda w: w, w)
        beta = jnp.where(broke, 0.0, beta)
        v_next = _normalize(w)
        alphas = alphas.at[j].set(alpha)
        betas = betas.at[j].set(beta)
        done = stop(alphas, betas, j) if stop is not None else jnp.bool_(False)
        return j + 1, v_next, v, beta, alphas, betas, V, norm_est, done

    def cond(s):
        return (s[0] < m) & jnp.logical_not(s[-1])

    def init(v0):
        v0 = _normalize(v0)
        z = jnp.zeros((m,), dtype)
        return (jnp.int32(0), v0, jnp.zeros_like(v0), jnp.zeros((), dtype), z, z, jnp.zeros((m, n), dtype),
                jnp.zeros((), dtype), jnp.bool_(False))

    run = make_while(cond, body, init(example_v0), loop)

    def lanczos(v0):
        j, _, _, _, alphas, betas, V, _, _ = run(init(v0))
        return alphas, betas, V, j

    return lanczos
