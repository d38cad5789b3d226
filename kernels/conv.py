"""Integer 2-D convolution on the same kernels: im2col into :func:`int_matmul`, or XLA's conv.

A convolution is a matrix product of its patches: for NHWC input and HWIO weights,
``conv(x, w) = patches(x) @ w.reshape(KH*KW*C, O)``, with ``patches`` built by padding and
``KH*KW`` strided slices (cheap copies). This is how the Pallas backends, which only multiply matrices, reach every
convolution of the integer executor. On the XLA backend ``method="auto"`` picks the faster
of im2col and ``lax.conv_general_dilated(..., preferred_element_type=int32)``, as measured
by ``benchmarks/int_matmul.py`` (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .dispatch import _resolve, int_matmul
from .requant import Requant, apply_requant, check_requant

__all__ = ["int_conv2d", "im2col"]

_XLA_AUTO_METHOD = "im2col"  # measured on XLA:CPU, see benchmarks/RESULTS.md


def _pair(v, name):
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or any(int(x) < 1 for x in v):
        raise ValueError(f"int_conv2d: {name}={v}; use a positive int or a pair of them")
    return v


def _padding(padding, kernel, strides, spatial):
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            return tuple(lax.padtype_to_pads(spatial, kernel, strides, "SAME"))
        raise ValueError(f"int_conv2d: padding={padding!r}; use 'SAME', 'VALID' or pairs")
    pads = tuple(tuple(int(q) for q in p) for p in padding)
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(f"int_conv2d: padding={padding}; use ((top, bottom), (left, right))")
    return pads


def im2col(x, kernel_hw, strides=(1, 1), padding="SAME", *, pad_value=0):
    """Patches of NHWC ``x`` as (N, Ho, Wo, KH*KW*C), ordered to match ``w.reshape(-1, O)``.

    ``pad_value`` should be the integer the input's quantizer maps the real value 0 to: 0 for
    HAWQ-V3's symmetric quantizers, the zero point for asymmetric ones.
    """
    kh, kw = kernel_hw
    strides = _pair(strides, "strides")
    pads = _padding(padding, (kh, kw), strides, x.shape[1:3])
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=jnp.asarray(pad_value, x.dtype))
    ho = (xp.shape[1] - kh) // strides[0] + 1
    wo = (xp.shape[2] - kw) // strides[1] + 1
    cols = [xp[:, i:i + (ho - 1) * strides[0] + 1:strides[0],
               j:j + (wo - 1) * strides[1] + 1:strides[1], :]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


_patches_jit = jax.jit(im2col, static_argnames=("kernel_hw", "strides", "padding"))


@functools.partial(jax.jit, static_argnames=("strides", "pads"))
def _xla_conv(x, w, out_scale, *, strides, pads):
    xi = x.astype(jnp.int32) if x.dtype == jnp.uint8 else x  # conv has no mixed u8 x s8
    acc = lax.conv_general_dilated(xi, w.astype(xi.dtype), strides, pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   preferred_element_type=jnp.int32)
    return apply_requant(acc, out_scale)


def int_conv2d(x, w, *, strides=(1, 1), padding="SAME", out_scale: Requant | None = None,
               backend: str = "auto", interpret: bool | None = None, blocks=None,
               method: str = "auto"):
    """Integer convolution NHWC int8/uint8 x HWIO int8 -> int32, or requantized.

    Parameters
    ----------
    x : int8 or uint8 array (N, H, W, C)
    w : int8 array (KH, KW, C, O)
    strides, padding
        As ``lax.conv_general_dilated`` ('SAME', 'VALID' or explicit pairs).
    out_scale : Requant, optional
        Fused per-output-channel epilogue (see :func:`hqjax.kernels.int_matmul`).
    backend, interpret, blocks
        As :func:`hqjax.kernels.int_matmul`.
    method : {"auto", "im2col", "xla_conv"}
        ``"xla_conv"`` is only available on the ``"xla"`` backend; Pallas backends always
        use im2col. ``"auto"`` picks im2col on Pallas and the measured faster on XLA.

    Returns
    -------
    int32 (or ``out_scale``'s dtype) array (N, Ho, Wo, O), identical for every backend and
    method.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.ndim != 4 or w.ndim != 4 or x.shape[-1] != w.shape[2]:
        raise ValueError(f"int_conv2d: need x (N, H, W, C) and w (KH, KW, C, O) with equal C, "
                         f"got {x.shape} and {w.shape}")
    if x.dtype not in (jnp.int8, jnp.uint8) or w.dtype != jnp.int8:
        raise TypeError(f"int_conv2d: need int8/uint8 x and int8 w, got {x.dtype}, {w.dtype}")
    resolved, _, _ = _resolve(backend, interpret, blocks)
    if method == "auto":
        method = _XLA_AUTO_METHOD if resolved == "xla" else "im2col"
    if method not in ("im2col", "xla_conv"):
        raise ValueError(f"int_conv2d: method={method!r}; use 'auto', 'im2col' or 'xla_conv'")
    if method == "xla_conv":
        if resolved != "xla":
            raise ValueError(f"int_conv2d: method='xla_conv' needs backend='xla', got {resolved!r}")
        if out_scale is not None:
            check_requant(out_scale, w.shape[-1])
        strides = _pair(strides, "strides")
        pads = _padding(padding, w.shape[:2], strides, x.shape[1:3])
        return _xla_conv(x, w, out_scale, strides=strides, pads=pads)
    return _im2col_conv(x, w, _pair(strides, "strides"),
                        _padding(padding, w.shape[:2], _pair(strides, "strides"), x.shape[1:3]),
                        out_scale, backend, interpret, blocks)


def _im2col_conv(x, w, strides, pads, out_scale, backend, interpret, blocks):
    # jitted pieces: eager im2col would dispatch (and compile) one tiny op per slice
    patches = _patches_jit(x, kernel_hw=w.shape[:2], strides=strides, padding=pads)
    return int_matmul(patches, w.reshape(-1, w.shape[-1]), out_scale=out_scale,
                      backend=backend, interpret=interpret, blocks=blocks)
