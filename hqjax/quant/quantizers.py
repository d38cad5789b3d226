"""Uniform quantizers: specs, integer arrays, fake quantization with a straight-through gradient.

A real tensor ``x`` is represented by integers ``q`` and a scale ``S`` (and a zero point ``z``)
with ``x ≈ S (q - z)`` (Jacob et al. 2018, Eq. 1; HAWQ-V3, Yao et al. 2021, Eq. 1):

- symmetric (HAWQ-V3 weights): ``z = 0``, ``q ∈ [-(2^{b-1}-1), 2^{b-1}-1]``,
  ``S = max|x| / (2^{b-1}-1)``;
- asymmetric: ``q ∈ [-2^{b-1}, 2^{b-1}-1]``, ``S = (max - min) / (2^b - 1)``, ``z`` an integer;
- unsigned (HAWQ-V3 activations after ReLU): the range ``[0, max]`` uses all ``2^b`` levels,
  ``S = max / (2^b - 1)``, stored shifted into the signed range with ``z = -2^{b-1}`` so that
  8-bit unsigned activations still fit in ``int8`` (the integer executor folds the shift into
  the bias).

Granularity: one scale per tensor, per channel along ``axis``, or per group of ``group_size``
consecutive rows along ``axis`` (Q-BERT's group-wise quantization, Shen et al. 2020, Sec. 3.2:
one group per attention head, or sub-groups within a head).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from hqjax._bits import ACT_BITS, WEIGHT_BITS

__all__ = [
    "QuantSpec",
    "QArray",
    "int_range",
    "tensor_range",
    "qparams_from_range",
    "quantize",
    "dequantize",
    "fake_quant",
    "weight_perturbation",
]

# hqjax._bits is the policy for layers; 16 and 32 also hold residual paths and biases
_VALID_BITS = tuple(sorted({*WEIGHT_BITS, *ACT_BITS, 16, 32}))


@struct.dataclass
class QuantSpec:
    """How to quantize one tensor.

    Attributes
    ----------
    bits : integer width, 2–8 (weights, activations) or 16/32 (residual paths, biases).
    mode : ``'symmetric'``, ``'asymmetric'`` or ``'unsigned'`` (range ``[0, max]``).
    axis : ``None`` for one scale per tensor, else the channel axis that keeps its own scales
        (``-1``: the output channels of a Dense/Conv kernel).
    group_size : with ``axis`` set, consecutive rows along ``axis`` that share one scale
        (Q-BERT); ``None`` means one scale per row (per-channel).
    clip_grad : straight-through gradient is zero outside the clipping range when True
        (PACT-style), identity everywhere when False (Bengio et al. 2013).
    """

    bits: int = struct.field(pytree_node=False, default=8)
    mode: str = struct.field(pytree_node=False, default="symmetric")
    axis: int | None = struct.field(pytree_node=False, default=None)
    group_size: int | None = struct.field(pytree_node=False, default=None)
    clip_grad: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if self.bits not in _VALID_BITS:
            raise ValueError(f"QuantSpec bits={self.bits!r} is not supported: use 2–8, 16 or 32")
        if self.mode not in ("symmetric", "asymmetric", "unsigned"):
            raise ValueError(f"QuantSpec mode={self.mode!r}: use 'symmetric', 'asymmetric' or 'unsigned'")
        if self.group_size is not None and (self.axis is None or self.group_size < 1):
            raise ValueError(f"QuantSpec group_size={self.group_size!r} needs a channel axis and a positive size")

    @property
    def storage_dtype(self):
        return jnp.int8 if self.bits <= 8 else jnp.int32

    def to_dict(self) -> dict:
        return {"bits": self.bits, "mode": self.mode, "axis": self.axis, "group_size": self.group_size,
                "clip_grad": self.clip_grad}


@struct.dataclass
class QArray:
    """Integers ``values`` with ``x ≈ scale * (values - zero_point)``.

    ``scale`` and ``zero_point`` have ``values.ndim`` dimensions: size 1 on reduced axes,
    the number of channels (or groups) on ``spec.axis``.
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    spec: QuantSpec = struct.field(pytree_node=False)

    @property
    def shape(self):
        return self.values.shape


def int_range(spec: QuantSpec, bits=None) -> tuple:
    """``(qmin, qmax)``: the integers a spec may produce (Python ints; arrays when ``bits``,
    a traced width that overrides ``spec.bits``, is given)."""
    if bits is None:
        b = spec.bits
        if spec.mode == "symmetric":
            return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    # an integer shift: exact, where exp2 in float32 need not be
    half = jnp.left_shift(jnp.int32(1), jnp.asarray(bits, jnp.int32) - 1).astype(jnp.float32)
    return (1.0 - half if spec.mode == "symmetric" else -half), half - 1.0


# --------------------------------------------------------------------------- granularity
def _axis(spec: QuantSpec, ndim: int) -> int | None:
    if spec.axis is None:
        return None
    if not -ndim <= spec.axis < ndim:
        raise ValueError(f"QuantSpec axis={spec.axis} is out of range for a tensor of rank {ndim}")
    return spec.axis % ndim


def _grouped(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, tuple[int, ...]]:
    """``x`` reshaped so that group statistics are reductions over every axis but one."""
    ax = _axis(spec, x.ndim)
    if ax is None:
        return x.reshape(1, -1), tuple(1 for _ in x.shape)
    n = x.shape[ax]
    g = spec.group_size or 1
    if n % g:
        raise ValueError(f"group_size={g} does not divide the {n} rows along axis {spec.axis}; "
                         f"use a divisor of {n} (e.g. the head dimension)")
    xt = jnp.moveaxis(x, ax, 0).reshape(n // g, -1)
    stat_shape = tuple(n // g if i == ax else 1 for i in range(x.ndim))
    return xt, stat_shape


def _expand(stat: jax.Array, spec: QuantSpec, shape: tuple[int, ...]) -> jax.Array:
    """Broadcastable per-element view of a per-group statistic."""
    ax = _axis(spec, len(shape))
    if ax is None or not spec.group_size or spec.group_size == 1:
        return stat
    return jnp.repeat(stat, spec.group_size, axis=ax)


def tensor_range(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Min and max of ``x`` per tensor, channel or group (the statistic shape of ``spec``)."""
    xt, shape = _grouped(x, spec)
    return xt.min(axis=1).reshape(shape), xt.max(axis=1).reshape(shape)


def qparams_from_range(x_min: jax.Array, x_max: jax.Array, spec: QuantSpec,
                       bits=None) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point that map ``[x_min, x_max]`` onto the integer range of ``spec``
    (of width ``bits`` when given: a traced width overriding ``spec.bits``).

    The range is widened to contain 0 so that 0 is exact (zero padding, ReLU); a degenerate
    range gets scale 1 rather than a division by zero.
    """
    x_min = jnp.minimum(jnp.asarray(x_min, jnp.float32), 0.0)
    x_max = jnp.maximum(jnp.asarray(x_max, jnp.float32), 0.0)
    qmin, qmax = int_range(spec, bits)
    levels = qmax - qmin  # 2^b - 1 for the asymmetric and unsigned ranges
    if spec.mode == "symmetric":
        scale = jnp.maximum(-x_min, x_max) / qmax
        zero = jnp.zeros_like(scale)
    elif spec.mode == "unsigned":
        scale = x_max / levels
        zero = jnp.full_like(scale, qmin)
    else:
        scale = (x_max - x_min) / levels
        safe = jnp.where(scale > 0, scale, 1.0)
        zero = jnp.clip(jnp.round(qmin - x_min / safe), qmin, qmax)
    scale = jnp.where(scale > 0, scale, 1.0)
    return scale, zero


# --------------------------------------------------------------------------- quantize
def _qparams(x, spec, x_range, bits=None):
    if x_range is None:
        x_range = tensor_range(jax.lax.stop_gradient(x), spec)
    scale, zero = qparams_from_range(*x_range, spec, bits)
    return jax.lax.stop_gradient(scale), jax.lax.stop_gradient(zero)


# largest float32 below 2^31: 32-bit integers computed in float32 must not round up past int32
_F32_INT32_MAX = 2**31 - 128


def _round_clip(x, scale, zero, qmin, qmax):
    return jnp.clip(jnp.round(x / scale) + zero, jnp.maximum(qmin, -_F32_INT32_MAX), jnp.minimum(qmax, _F32_INT32_MAX))


def quantize(x: jax.Array, spec: QuantSpec, x_range: tuple[Any, Any] | None = None) -> QArray:
    """Integer representation of ``x``: ``values = clip(round(x / S) + z, qmin, qmax)``.

    Parameters
    ----------
    x : real tensor.
    spec : the quantizer.
    x_range : ``(min, max)`` clipping range with the statistic shape of ``spec`` (from a
        calibrator); default: the range of ``x`` itself (weights).
    """
    scale, zero = _qparams(x, spec, x_range)
    qmin, qmax = int_range(spec)
    q = _round_clip(x, _expand(scale, spec, x.shape), _expand(zero, spec, x.shape), qmin, qmax)
    return QArray(q.astype(spec.storage_dtype), scale, zero.astype(jnp.int32), spec)


def dequantize(qa: QArray) -> jax.Array:
    """``scale * (values - zero_point)`` in float32."""
    s = _expand(qa.scale, qa.spec, qa.values.shape)
    z = _expand(qa.zero_point, qa.spec, qa.values.shape)
    return s * (qa.values.astype(jnp.float32) - z.astype(jnp.float32))


# the integer range is an operand (with no gradient) rather than static, so a traced bit
# width (``fake_quant(..., bits=)``) shares one compiled program across widths
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ste(x, scale, zero, qmin, qmax, clip_grad):
    return scale * (_round_clip(x, scale, zero, qmin, qmax) - zero)


def _ste_fwd(x, scale, zero, qmin, qmax, clip_grad):
    y = _ste(x, scale, zero, qmin, qmax, clip_grad)
    inside = (x >= scale * (qmin - zero)) & (x <= scale * (qmax - zero))
    return y, (inside, scale, zero, qmin, qmax)


def _ste_bwd(clip_grad, res, g):
    inside, scale, zero, qmin, qmax = res
    gx = jnp.where(inside, g, jnp.zeros_like(g)) if clip_grad else g
    return gx, jnp.zeros_like(scale), jnp.zeros_like(zero), jnp.zeros_like(qmin), jnp.zeros_like(qmax)


_ste.defvjp(_ste_fwd, _ste_bwd)


def fake_quant(x: jax.Array, spec: QuantSpec, x_range: tuple[Any, Any] | None = None, *, bits=None) -> jax.Array:
    """Quantize-dequantize ``x`` with the straight-through estimator (STE) as its gradient.

    Forward: ``S (clip(round(x/S) + z, qmin, qmax) - z)``. Backward: ``dy/dx = 1`` (or
    ``1[x inside the clipping range]`` when ``spec.clip_grad``); no gradient reaches the
    scale, which comes from the data or a calibrated ``x_range``.

    ``bits`` (optional, an integer array, may be traced) overrides ``spec.bits``: one
    compiled function then serves every width (a sweep over bit configurations).
    """
    scale, zero = _qparams(x, spec, x_range, bits)
    qmin, qmax = int_range(spec, bits)
    s = _expand(scale, spec, x.shape).astype(x.dtype)
    z = _expand(zero, spec, x.shape).astype(x.dtype)
    return _ste(x, s, z, jnp.asarray(qmin, x.dtype), jnp.asarray(qmax, x.dtype), spec.clip_grad)


def weight_perturbation(w: jax.Array, bits: int, mode: str = "symmetric", axis: int | None = -1,
                        group_size: int | None = None) -> jax.Array:
    """``||Q_b(W) - W||_2^2``, the weight perturbation of HAWQ-V2 (Dong et al. 2020, Eq. 4)
    and HAWQ-V3 (Eq. 10's ``ΔW``), per-channel symmetric along ``axis`` by default.

    Parameters
    ----------
    w : a layer's kernel; bits : candidate precision; mode, axis, group_size : the quantizer
        granularity (``axis=None`` for per-tensor).
    """
    spec = QuantSpec(bits=int(bits), mode=mode, axis=axis, group_size=group_size)
    d = fake_quant(w, spec) - w
    return jnp.sum(jnp.square(d.astype(jnp.float32)))

