"""Integer matmul kernels (Pallas GPU/TPU, XLA reference), imported as ``hqjax.kernels``.

The integer products of integer-only inference (HAWQ-V3, Yao et al., 2021): int8 x int8 ->
int32 and int4-weight x int8 matrix products with an optional fused dyadic requantization
epilogue, on three backends that return identical integers:

- ``"xla"``: ``lax.dot_general(..., preferred_element_type=int32)`` (:mod:`.reference`);
- ``"triton"``: Pallas Triton kernels for NVIDIA GPUs (:mod:`.triton`);
- ``"mosaic"``: Pallas Mosaic kernels for TPUs (:mod:`.mosaic`).

``backend="auto"`` picks by platform (:func:`default_backend`); :func:`int_conv2d` reaches
the same kernels through im2col.

:func:`cpu_convolutions` is the float side: it rewrites a function's convolutions for
XLA:CPU (hqjax's native forward kernel or jaxlib's oneDNN for small windows, hqjax's
native kernel from :mod:`.cpu_wgrad` or explicit layouts for weight gradients, and
:mod:`.cpu_matmul`'s strided GEMM for weight gradients over tokens or written transposed,
and batched products),
which the curvature operators use by default on the CPU (``convolutions="auto"``).
"""

from .conv import im2col, int_conv2d
from .cpu_conv import cpu_convolutions, onednn_status
from .cpu_matmul import native_matmul_status, strided_matmul
from .cpu_wgrad import native_forward_status, native_wgrad_status
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
    "cpu_convolutions",
    "default_backend",
    "dyadic_from_scale",
    "dyadic_round",
    "im2col",
    "int4_matmul",
    "int_conv2d",
    "int_matmul",
    "native_forward_status",
    "native_matmul_status",
    "native_wgrad_status",
    "onednn_status",
    "pack_int4",
    "requant_from_scale",
    "requantize",
    "strided_matmul",
    "unpack_int4",
]
