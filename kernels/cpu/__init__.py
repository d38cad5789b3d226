"""hqjax.kernels.cpu: an opt-in backend of faster XLA:CPU kernels for curvature work.

Nothing in hqjax uses it unless asked: the library is plain JAX. One function enters it::

    from hqjax.kernels.cpu import accelerate
    mv = accelerate(hqjax.hessian(loss, params))     # same values, faster on XLA:CPU

:func:`accelerate` rewrites the wrapped function's jaxpr: weight gradients and small-window
convolutions go to hqjax's native C++ kernels or jaxlib's oneDNN custom call, the matrix
products XLA:CPU transposes first go to a native strided GEMM, and the remaining
convolutions get explicit layouts. :func:`~.gram_schmidt.orthogonalize` is the native
Lanczos reorthogonalization, passed as ``orthogonalize=`` to :func:`hqjax.top_eigenvalues`
or :func:`hqjax.spectral_density`; :func:`reuse_host_memory` tunes glibc's allocator for
XLA:CPU (the ``hqjax`` command calls it). Whether any of it is faster depends on the
processor: ``benchmarks/RESULTS.md`` says where it won and where it lost.

Files: ``_accelerate.py`` (the entry point, version check), ``rewrite.py`` (the jaxpr
rewrite), ``conv_primitives.py`` (oneDNN and native convolution primitives),
``conv_weight_grad.py``, ``conv_forward.py``, ``matmul.py``, ``gram_schmidt.py`` (one
native kernel each), ``native_kernels.cc`` (their C++), ``_library.py`` (build, cache,
self-check), ``host_memory.py`` (allocator settings).

Environment: ``HQJAX_CACHE_DIR`` (default ``~/.cache/hqjax``) holds the compiled library
and the record of a failed build; ``CXX`` picks the compiler.

Safety: the backend uses JAX internals (``jax._src``), so it runs only under the JAX
versions in :data:`TESTED_JAX` and otherwise returns functions unchanged with one warning
on the ``"hqjax"`` logger. A failed build (remembered on disk) or self-check also warns
once and leaves XLA's operations in place. Importing this package imports no JAX internals;
:func:`accelerate` does, on first use.
"""

from . import _library
from ._accelerate import MODES, TESTED_JAX, accelerate, supported
from .host_memory import HostMemory, reuse_host_memory

__all__ = ["HostMemory", "MODES", "TESTED_JAX", "accelerate", "orthogonalize", "reuse_host_memory", "supported"]


def orthogonalize(w, V, j, passes: int):
    """Lanczos reorthogonalization by the native Gram-Schmidt kernel where it runs (see
    :func:`hqjax.kernels.cpu.gram_schmidt.orthogonalize`); plain JAX elsewhere or under an
    untested JAX version."""
    ok, why = supported()
    if not ok:
        from hqjax.curvature.lanczos import gram_schmidt

        _library.warn_once(why)
        return gram_schmidt(w, V, j, passes)
    from .gram_schmidt import orthogonalize as native

    return native(w, V, j, passes)
