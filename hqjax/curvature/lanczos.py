"""The Lanczos process with full reorthogonalization, shared by eigen and density.

Lanczos (1950) builds an orthonormal Krylov basis ``V`` and the tridiagonal ``T = V^T M V``
one matvec per step. In floating point the basis loses orthogonality as Ritz values
converge, which creates spurious copies of eigenvalues; re-orthogonalizing every new vector
against all previous ones prevents it at ``O(n m)`` memory. PyHessian's SLQ (Yao et al. 2020,
Alg. 3) does one Gram-Schmidt pass per step; the default here is two ("twice is enough",
Parlett 1998 Sec. 6.9), which keeps the basis orthogonal to working precision. The basis is
stored in ``~sqrt(m)`` row blocks so that step ``j`` reads only the ``j`` vectors it has.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from hqjax.curvature._loop import make_while

__all__ = ["Orthogonalize", "basis_blocks", "check_reorth_passes", "gram_schmidt", "lanczos_runner",
           "stack_basis", "tridiagonal"]

# ``(w, V, j, passes) -> w`` with its components along basis vectors ``0..j`` removed.
Orthogonalize = Callable[[jax.Array, tuple, jax.Array, int], jax.Array]


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """``T`` with ``alphas`` on the diagonal and ``betas[:-1]`` off it (``betas[j]`` couples j, j+1)."""
    off = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def basis_blocks(m: int) -> tuple[int, int]:
    """``(rows per block, number of blocks)`` for an ``m``-vector Krylov basis: about ``sqrt(m)`` each.

    Step ``j`` re-orthogonalizes only against the blocks that hold vectors ``0..j``, so the
    whole process reads ``~m^2/2`` basis rows instead of ``m^2``, at one small branch per block.
    """
    rows = max(1, math.isqrt(max(int(m) - 1, 0)) + 1)
    return rows, -(-int(m) // rows)


def gram_schmidt(w, V, j, passes: int):
    """Remove from ``w`` its components along basis vectors ``0..j`` (blocks ``V``), ``passes`` times.

    Classical Gram-Schmidt, block by block: one pass is Gram-Schmidt against the whole
    basis (PyHessian's SLQ does one modified Gram-Schmidt pass); two passes restore
    orthogonality to working precision ("twice is enough", Parlett 1998). The default
    ``orthogonalize`` of :func:`lanczos_runner`; any function with this signature (e.g.
    a native kernel) may replace it.
    """
    rows = V[0].shape[0] - 1  # the last row of a block is scratch (see _set_row)
    for _ in range(passes):
        for b, Vb in enumerate(V):
            i = jnp.arange(rows + 1)
            mask = ((b * rows + i <= j) & (i < rows)).astype(w.dtype)
            # cond, not a mask alone: blocks past j are all zero, and reading them is the cost
            w = jax.lax.cond(b * rows <= j, lambda w, Vb=Vb, mask=mask: w - ((Vb @ w) * mask) @ Vb,
                             lambda w: w, w)
    return w


def _set_row(V, j, v):
    """The basis with vector ``j`` set to ``v``, written in place.

    Every block gets one row written, so no block needs a branch: the owner of vector ``j``
    at its row, the others at their scratch row. Selecting between ``v`` and the row already
    there instead made XLA copy every block each step.
    """
    rows = V[0].shape[0] - 1
    out = []
    for b, Vb in enumerate(V):
        mine = (j >= b * rows) & (j < (b + 1) * rows)
        out.append(jax.lax.dynamic_update_index_in_dim(Vb, v, jnp.where(mine, j - b * rows, rows), 0))
    return tuple(out)


def stack_basis(V, m: int) -> jax.Array:
    """The blocked basis as one ``[m, n]`` array."""
    return jnp.concatenate([Vb[:-1] for Vb in V])[:m]


def _normalize(w):
    """``w / ||w||`` computed on ``w / max|w|`` so tiny vectors do not underflow; 0 stays 0."""
    s = jnp.max(jnp.abs(w))
    u = w / jnp.where(s > 0, s, 1.0)
    nrm = jnp.linalg.norm(u)
    return u / jnp.where(nrm > 0, nrm, 1.0)


def lanczos_runner(flat_mv: Callable[[jax.Array], jax.Array], num_steps: int, example_v0: jax.Array, loop: str,
                   key: jax.Array, stop: Callable | None = None, reorth_passes: int = 2,
                   orthogonalize: Orthogonalize | None = None):
    """A function ``v0 -> (alphas [m], betas [m], V, steps)`` running ``m`` Lanczos steps.

    ``V`` is the basis as a tuple of row blocks (``stack_basis(V, m)`` gives ``[m, n]``).
    ``v0`` need not be normalized. On breakdown (``beta ~ 0``: the Krylov space is
    invariant, e.g. ``m`` exceeds the rank) the next basis vector is a fresh random vector
    orthogonal to ``V`` and the coupling is set to 0, so ``T`` stays exact and block-diagonal.
    ``stop(alphas, betas, j)`` (optional) ends the process early after step ``j``; the
    unused tail of ``alphas``/``betas`` is zero. ``reorth_passes`` (1 or 2) is the number of
    Gram-Schmidt passes against the basis per step, each done by ``orthogonalize``
    (default :func:`gram_schmidt`, plain JAX).
    """
    orthogonalize = gram_schmidt if orthogonalize is None else orthogonalize
    m = int(num_steps)
    passes = check_reorth_passes(reorth_passes)
    n = example_v0.shape[0]
    dtype = example_v0.dtype
    rows, nblocks = basis_blocks(m)

    def body(s):
        j, v, v_prev, beta_prev, alphas, betas, V, norm_est, _ = s
        V = _set_row(V, j, v)
        w = flat_mv(v)
        norm_est = jnp.maximum(norm_est, jnp.linalg.norm(w))  # running lower bound on ||M||
        alpha = jnp.vdot(w, v)
        w = w - alpha * v - beta_prev * v_prev
        w = orthogonalize(w, V, j, passes)
        beta = jnp.linalg.norm(w)
        # Breakdown relative to ||M||, not to this step: after the Krylov space is exhausted
        # what remains of w is rounding noise, which must not become a basis vector.
        broke = beta <= 1e-5 * norm_est

        def restart(w):
            # always two passes: a random vector starts far from orthogonal to the basis
            fresh = orthogonalize(jax.random.normal(jax.random.fold_in(key, j), (n,), dtype), V, j, 2)
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
        V = tuple(jnp.zeros((rows + 1, n), dtype) for _ in range(nblocks))  # + a scratch row each
        return (jnp.int32(0), v0, jnp.zeros_like(v0), jnp.zeros((), dtype), z, z, V, jnp.zeros((), dtype),
                jnp.bool_(False))

    run = make_while(cond, body, init(example_v0), loop)

    def lanczos(v0):
        j, _, _, _, alphas, betas, V, _, _ = run(init(v0))
        return alphas, betas, V, j

    return lanczos


def check_reorth_passes(reorth_passes) -> int:
    """``reorth_passes`` as an int, or a ValueError saying what is allowed."""
    if reorth_passes not in (1, 2) or isinstance(reorth_passes, bool):
        raise ValueError(f"reorth_passes must be 1 (PyHessian's single Gram-Schmidt pass) or 2 (full "
                         f"reorthogonalization to working precision), got {reorth_passes!r}")
    return int(reorth_passes)
