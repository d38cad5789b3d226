"""Modified Gram-Schmidt against a block of basis rows: Lanczos reorthogonalization on the CPU.

The third kernel of ``native_kernels.cc``: ``w -= (v_i . w) v_i`` for the rows of a basis
block, one row at a time, each row read from memory once, where XLA's classical
Gram-Schmidt (two matrix-vector products) streams every block twice.
:func:`orthogonalize` has the signature of :func:`hqjax.curvature.lanczos.gram_schmidt`, the
plain-JAX default, so it can be passed as the ``orthogonalize`` argument of
:func:`hqjax.top_eigenvalues` and :func:`hqjax.spectral_density`; it falls back to that
default where the kernel is unavailable (not float32, not the CPU, a failed self-check).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _library

__all__ = ["gram_schmidt", "native_gram_schmidt_status", "orthogonalize", "reference_gram_schmidt"]


def reference_gram_schmidt(w, basis, count):
    """Modified Gram-Schmidt in XLA: ``w -= (v_i . w) v_i`` for rows ``i < count`` of ``basis``."""
    count = jnp.clip(count, 0, basis.shape[0])

    def body(i, w):
        v = lax.dynamic_index_in_dim(basis, i, 0, keepdims=False)
        return w - jnp.vdot(v, w) * v

    return lax.fori_loop(0, count, body, w)


def gram_schmidt(w, basis, count):
    """:func:`reference_gram_schmidt` by the native kernel (float32, CPU only, no autodiff).

    ``w [n]`` minus its projections on rows ``0..count-1`` of ``basis [rows, n]``, one row at
    a time, each basis row read from memory once; ``w``'s buffer is updated in place.
    """
    ok, lib = _library.register()
    if not ok:
        raise RuntimeError(f"the native Gram-Schmidt kernel is unavailable: {lib}")
    return jax.ffi.ffi_call(_library.GRAM_SCHMIDT_TARGET, jax.ShapeDtypeStruct(w.shape, w.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")(w, basis, jnp.asarray(count, jnp.int32))


def _gram_schmidt_cases(draw):
    for rows, n, count in ((5, 9, 3), (4, 300_001, 4), (3, 4096 * 5 + 7, 0), (2, 1, 5)):
        w, basis = draw((n,)), draw((rows, n))
        basis = basis / jnp.linalg.norm(basis, axis=1, keepdims=True)
        yield (jax.jit(gram_schmidt)(w, basis, count), jax.jit(reference_gram_schmidt)(w, basis, count),
               f"{rows} rows of {n}, count {count}")


@functools.lru_cache(maxsize=1)
def native_gram_schmidt_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the native Gram-Schmidt builds, loads and agrees with XLA.

    Once per process, like :func:`native_wgrad_status` (same library), on blocks that are one
    row, shorter than a chunk, many chunks with a remainder, and counts of 0 and past the end.
    """
    return _library.self_check("Gram-Schmidt kernel", _gram_schmidt_cases)


def orthogonalize(w, V, j, passes: int):
    """:func:`hqjax.curvature.lanczos.gram_schmidt` by the native kernel where it can run.

    Modified Gram-Schmidt, ``passes`` times, against basis vectors ``0..j`` stored as row
    blocks ``V`` (each block's last row is scratch). Float32 on the CPU with the kernel
    built and checked (:func:`native_gram_schmidt_status`); anything else runs the plain-JAX
    default.
    """
    from hqjax.curvature.lanczos import gram_schmidt as default

    if not (w.dtype == jnp.float32 and jax.default_backend() == "cpu" and native_gram_schmidt_status()[0]):
        return default(w, V, j, passes)
    rows = V[0].shape[0] - 1
    for _ in range(passes):
        for b, Vb in enumerate(V):
            count = jnp.clip(j - b * rows + 1, 0, rows)
            w = lax.cond(b * rows <= j, lambda w, Vb=Vb, count=count: gram_schmidt(w, Vb, count), lambda w: w, w)
    return w
