"""Integer matmul kernels (Pallas GPU/TPU, XLA reference), imported as ``hqjax.kernels``.

The integer products of integer-only inference (HAWQ-V3, Yao et al., 2021): int8 x int8 ->
int32 and int4-weight x int8 matrix products with an optional fused dyadic requantization
epilogue, on three backends that return identical integers:

- ``"xla"``: ``lax.dot_general(..., preferred_element_type=int32)`` (:mod:`.reference`);
- ``"triton"``: Pallas Triton kernels for NVIDIA GPUs (:mod:`.triton`);
- ``"mosaic"``: Pallas Mosaic kernels for TPUs (:mod:`.mosaic`).

``backend="auto"`` picks by platform (:func:`default_backend`); :func:`int_conv2d` reaches
the same kernels through im2col.

The opt-in float-side CPU backend (native convolution and GEMM kernels, jaxlib's oneDNN,
host-memory tuning) is the separate sub-package :mod:`hqjax.kernels.cpu`, which this
package does not import.
"""

from .conv import im2col, int_conv2d
from .dispatch import BACKENDS, default_backend, int4_matmul, int_matmul
from .mosaic import MosaicBlocks
from .packing import pack_int4, unpack_int4
from .requant import Requant, dyadic_from_scale, dyadic_round, requant_from_scale, requantize
from .triton import TritonBlocks

__all__ = [
    "BACKENDS",
    "MosaicBlocks",
    "Requant",
    "TritonBlocks",
    "default_backend",
    "dyadic_from_scale",
    "dyadic_round",
    "im2col",
    "int4_matmul",
    "int_conv2d",
    "int_matmul",
    "pack_int4",
    "requant_from_scale",
    "requantize",
    "unpack_int4",
]
