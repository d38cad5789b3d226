"""The native direct forward 2-D convolution (the second kernel of ``native_kernels.cc``).

NHWC input, HWIO kernel, strides and padding, no dilation or groups; a 6-pixel x
16-channel register tile. :mod:`.conv_primitives` binds it as ``native_conv_p``'s CPU
lowering for small windows when :func:`native_forward_status` passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _library

__all__ = ["forward_ffi_call", "forward_lowering", "native_forward_status"]


def forward_lowering(ctx, x, w, *, window_strides, padding):
    """MLIR lowering of the native forward convolution ``[B,H,W,CI] x [KH,KW,CI,CO] -> [B,OH,OW,CO]``
    (output shape from ``ctx.avals_out``; high padding is implied by it). Needs :func:`._library.register`."""
    return jax.ffi.ffi_lowering(_library.FORWARD_TARGET)(ctx, x, w, stride_h=np.int64(window_strides[0]),
                                               stride_w=np.int64(window_strides[1]), pad_h=np.int64(padding[0][0]),
                                               pad_w=np.int64(padding[1][0]))


def forward_ffi_call(x, w, *, window_strides, padding):
    """The native forward convolution called directly (NHWC x HWIO -> NHWC; no autodiff, CPU only)."""
    out = [(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(x.shape[1:3], w.shape[:2], window_strides, padding)]
    return jax.ffi.ffi_call(_library.FORWARD_TARGET, jax.ShapeDtypeStruct((x.shape[0], *out, w.shape[3]), jnp.float32))(
        x, w, stride_h=np.int64(window_strides[0]), stride_w=np.int64(window_strides[1]),
        pad_h=np.int64(padding[0][0]), pad_w=np.int64(padding[1][0]))


_FORWARD_PROBES = (  # (x shape, w shape, strides, padding)
    ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),
    ((1, 9, 8, 5), (3, 3, 5, 17), (2, 2), ((1, 1), (1, 1))),     # stride 2, batch 1, a masked co tail
    ((3, 6, 7, 8), (1, 1, 8, 9), (2, 2), ((0, 0), (0, 0))),      # 1x1 projection
    ((2, 10, 9, 7), (3, 2, 7, 20), (2, 1), ((2, 0), (0, 1))),    # asymmetric everything
    ((2, 5, 16, 16), (3, 3, 16, 32), (1, 1), ((1, 1), (1, 1))),  # full 6-pixel tiles, two co blocks
)


def _forward_cases(draw):
    for x_shape, w_shape, strides, padding in _FORWARD_PROBES:
        x, w = draw(x_shape), draw(w_shape)
        ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                    precision=lax.Precision.HIGHEST)
        yield (jax.jit(functools.partial(forward_ffi_call, window_strides=strides, padding=padding))(x, w),
               jax.jit(ref)(x, w), f"{x_shape} x {w_shape}, {strides}, {padding}")


@functools.lru_cache(maxsize=1)
def native_forward_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the native forward convolution builds, loads and agrees with XLA.

    Once per process, like :func:`native_wgrad_status` (same library), on cases with strides,
    asymmetric padding, 1x1 kernels, batch 1 and channel counts that are not multiples of 8.
    """
    return _library.self_check("forward convolution", _forward_cases)
