"""Default Pallas tiles per backend and accelerator: the one place tuned tile sizes go.

:func:`hqjax.kernels.int_matmul` and :func:`~hqjax.kernels.int4_matmul` read
:data:`TILES` when the caller passes no ``blocks``. Each backend maps a substring of the
device kind (``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``) to the
tiles for that accelerator; the longest matching key wins and ``""`` is the fallback.

Every entry is still the kernel class's default, untuned: no Pallas kernel has run on an
accelerator yet. ``benchmarks/device_check.py`` sweeps block sizes at 4096^3 on the device
and writes the fastest as ``proposed_default`` in its JSON, keyed by device kind; that is
the entry to add here once measured (e.g. ``"H100": TritonBlocks(128, 256, 64, 8, 3, 8)``).

Small products are memory-bound and keep their own tiles: for ``M <= 64`` the Triton
backend uses its small-M configuration (``triton._SMALL_M_BLOCKS``) whatever the entry.
"""

from __future__ import annotations

from types import MappingProxyType

import jax

from .mosaic import MosaicBlocks
from .triton import _SMALL_M, TritonBlocks

__all__ = ["TILES", "default_blocks", "lookup"]

TILES = MappingProxyType({
    "triton": MappingProxyType({"": TritonBlocks()}),  # untuned; add entries by device kind
    "mosaic": MappingProxyType({"": MosaicBlocks()}),  # untuned
})


def lookup(table, device_kind: str):
    """The entry of ``table`` whose key is the longest substring of ``device_kind``."""
    key = max((k for k in table if k in device_kind), key=len)
    return table[key]


def default_blocks(backend: str, m: int, device_kind: str | None = None):
    """Tiles for a Pallas ``backend`` (``"triton"`` or ``"mosaic"``) and an M-row product.

    ``device_kind`` defaults to JAX's first device (read at trace time; static per
    process). For Triton and ``M <= 64`` this is ``TritonBlocks()``, which the kernel turns
    into its memory-bound small-M configuration.
    """
    if backend == "triton" and m <= _SMALL_M:
        return TritonBlocks()
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    return lookup(TILES[backend], kind)
