"""Host-process settings that XLA:CPU's speed depends on.

XLA:CPU allocates an executable's scratch memory (its "temp" buffer, one block holding every
intermediate) afresh on each call and frees it afterwards. glibc serves a block that large
with ``mmap`` and returns it with ``munmap``, so every call faults the whole block in again,
one zero-filled 4 KiB page at a time (``benchmarks/host_memory.py`` measures it). Keeping
freed blocks in the process heap removes the faults; the cost is that the heap keeps its high-water mark
instead of giving memory back to the system between calls.
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from typing import NamedTuple

__all__ = ["HostMemory", "reuse_host_memory"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_INT_MAX = 2**31 - 1


class HostMemory(NamedTuple):
    """What :func:`reuse_host_memory` did.

    Attributes
    ----------
    applied : whether the allocator settings took effect for XLA's worker threads.
    reason : why not, when ``applied`` is false (empty otherwise).
    environment : the equivalent environment variables, for setting them before Python starts.
    """

    applied: bool
    reason: str
    environment: dict[str, str]


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this private probe: cannot tell
        return False


def reuse_host_memory(max_block_bytes: int = 1 << 30, *, warn: bool = True) -> HostMemory:
    """Make the process heap keep XLA:CPU's freed scratch memory for the next call.

    Sets three glibc ``mallopt`` parameters: one malloc arena (``M_ARENA_MAX``), because the
    other arenas' heaps hold at most 64 MiB and must ``mmap`` any larger block (XLA's worker
    threads would otherwise each use one); ``M_MMAP_THRESHOLD`` of ``max_block_bytes``, so
    blocks up to that size come from the heap; and the largest ``M_TRIM_THRESHOLD``, so freed
    memory is not handed back to the system.
    Blocks larger than ``max_block_bytes`` are still mapped and unmapped per call.

    Call it before JAX's first computation: JAX's CPU worker threads pick their malloc arena
    when they start and keep it. Called later it changes nothing, warns and reports
    ``applied=False``; setting :attr:`HostMemory.environment` before Python starts does the
    same from outside.

    The single arena serializes ``malloc`` across threads, which costs nothing measurable on
    the few-core hosts this helps most; on a many-core host measure before keeping it.
    Process-wide and not undoable, so hqjax never calls it on import: its command-line entry
    point (``hqjax``) and benchmarks call it explicitly.

    Parameters
    ----------
    max_block_bytes : the largest allocation served from the heap (default 1 GiB, at most
        ``2**31 - 1``).
    warn : warn when called too late (after JAX's first computation); the returned
        :class:`HostMemory` says so either way.

    Returns
    -------
    HostMemory
    """
    if not 0 < max_block_bytes <= _INT_MAX:
        raise ValueError(f"max_block_bytes must be in (0, 2**31 - 1], got {max_block_bytes}")
    env = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(max_block_bytes),
           "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX)}
    if not sys.platform.startswith("linux"):
        return HostMemory(False, f"not Linux ({sys.platform}): only glibc's allocator is tuned", env)
    if _backend_started():
        reason = ("JAX's backend had already started, and its worker threads keep the malloc arenas "
                  "they began with, so nothing was changed; call hqjax.kernels.cpu.reuse_host_memory() before the first "
                  "JAX computation, or set " + " ".join(f"{k}={v}" for k, v in env.items()) + " before Python starts")
        if warn:
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
        return HostMemory(False, reason, env)
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return HostMemory(False, "the C library is not glibc (musl?): its allocator is left as it is", env)
    ok = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_THRESHOLD, max_block_bytes),
          libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)]
    if not all(ok):
        names = [n for n, r in zip(("M_ARENA_MAX", "M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD"), ok) if not r]
        return HostMemory(False, f"glibc refused mallopt({', '.join(names)})", env)
    return HostMemory(True, "", env)
