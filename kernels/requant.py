"""Dyadic requantization: int32 accumulator -> int8/uint8 with an integer multiplier and shift.

HAWQ-V3 (Yao et al., 2021, Sec. 3.2 and Eq. 3) performs integer-only inference by replacing
the real rescaling ``S_w S_a / S_out`` of a layer's accumulator with a dyadic number
``m / 2^s``: an int32 multiplier ``m`` and a right shift ``s``. This module holds that
arithmetic as pure int32 ``jnp`` code, so the *same function* is the reference and the body
of every kernel's fused epilogue (Pallas Triton, Pallas Mosaic TPU and XLA). It never needs
int64 (disabled by default in JAX and slow or absent on accelerators): the 62-bit product
``acc * m`` is carried as a (high, low) pair of int32 words.

The rule, exactly (``q`` is the output)::

    q = clip(round((acc + bias) * m / 2^s) + zero_point, qmin, qmax)

with ``round`` to nearest, ties away from zero (as ``hqjax.quant``'s ``dyadic_requantize``
and TFLite's rounding right shift), ``acc + bias`` in int32, ``0 <= m < 2^31`` and
``1 <= s <= 62`` per output channel, and ``[qmin, qmax]`` the range of ``out_dtype`` (int8:
[-128, 127]; uint8: [0, 255]) or a narrower ``clip`` (e.g. [0, 15] for 4-bit unsigned
activations stored in uint8). A ReLU before the requantization is a lower clip at
``zero_point``, since the rounding is monotone and maps 0 to 0.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

__all__ = ["Requant", "requantize", "requant_from_scale", "dyadic_from_scale", "dyadic_round",
           "OUT_DTYPES"]

OUT_DTYPES = ("int8", "uint8")
_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1
_MAX_SHIFT = 62


@struct.dataclass
class Requant:
    """A fused requantization epilogue: per-output-channel dyadic scale, bias and clip.

    Attributes
    ----------
    multiplier : int32 array of shape (N,) or ()
        Integer multiplier ``m`` in ``[0, 2^31)``.
    shift : int32 array of shape (N,) or ()
        Right shift ``s`` in ``[1, 62]``; the channel's real scale is ``m / 2^s``.
    bias : int32 array of shape (N,) or () or None
        Added to the int32 accumulator before scaling (bias quantized with ``S_w S_a``).
    zero_point : int32 array of shape (N,) or () or None
        Added after rounding (asymmetric output quantization).
    out_dtype : str
        ``"int8"`` or ``"uint8"``: the dtype of the output and its default clip range.
    clip : (int, int) or None
        ``(qmin, qmax)`` inside ``out_dtype``'s range; None for the whole range.
    """

    multiplier: Any
    shift: Any
    bias: Any = None
    zero_point: Any = None
    out_dtype: str = struct.field(pytree_node=False, default="int8")
    clip: Any = struct.field(pytree_node=False, default=None)

    def to_json(self) -> dict:
        """Plain-data form (lists of ints) for JSON files."""
        as_list = lambda x: None if x is None else np.asarray(x).tolist()  # noqa: E731
        return {
            "multiplier": as_list(self.multiplier),
            "shift": as_list(self.shift),
            "bias": as_list(self.bias),
            "zero_point": as_list(self.zero_point),
            "out_dtype": self.out_dtype,
            "clip": None if self.clip is None else list(self.clip),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Requant":
        as_arr = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
        clip = d.get("clip")
        return cls(as_arr(d["multiplier"]), as_arr(d["shift"]), as_arr(d["bias"]),
                   as_arr(d.get("zero_point")), d["out_dtype"],
                   None if clip is None else tuple(clip))


def dyadic_from_scale(scale, bits: int = 31, *, what: str = "dyadic_from_scale"):
    """Dyadic approximation ``m / 2^s`` of positive real scales, as HAWQ-V3's ``batch_frexp``.

    ``scale = f * 2^e`` with ``f`` in [0.5, 1) (``frexp``); ``m = round(f * 2^bits)`` and
    ``s = bits - e`` (relative error at most ``2^-bits``). Host-side (NumPy): scales are
    calibration data, not traced values.

    Parameters
    ----------
    scale : array_like of positive floats
    bits : int
        Multiplier precision, 1..31 (the multiplier is int32).
    what : str
        Name of the caller, for error messages.

    Returns
    -------
    (multiplier, shift) : int32 NumPy arrays of ``scale``'s shape, ``m < 2^bits`` and
    ``1 <= s <= 62``.
    """
    scale = np.asarray(scale, np.float64)
    if not (1 <= bits <= 31):
        raise ValueError(f"{what}: bits={bits}; use 1..31 (the multiplier is int32)")
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(f"{what}: scales must be finite and > 0, got {scale.ravel()[:5]}")
    frac, exp = np.frexp(scale)
    mult = np.round(frac * 2.0**bits).astype(np.int64)
    shift = bits - exp.astype(np.int64)
    carry = mult == 2**bits  # frac rounded up to 1.0: halve to keep m < 2^bits
    mult = np.where(carry, mult // 2, mult)
    shift = np.where(carry, shift - 1, shift)
    if np.any(shift < 1) or np.any(shift > _MAX_SHIFT):
        bad = scale[(shift < 1) | (shift > _MAX_SHIFT)] if scale.ndim else scale
        raise ValueError(
            f"{what}: scale {bad} needs a shift outside [1, {_MAX_SHIFT}]; "
            f"scales between 2^-{_MAX_SHIFT - bits} and 2^{bits - 1} are representable"
        )
    return mult.astype(np.int32), shift.astype(np.int32)


def requant_from_scale(scale, bias=None, *, zero_point=None, out_dtype: str = "int8",
                       clip=None, bits: int = 31) -> Requant:
    """A :class:`Requant` from positive real scales, via :func:`dyadic_from_scale`.

    Parameters
    ----------
    scale : array_like of positive floats, shape (N,) or ()
        Real rescaling ``S_w S_a / S_out`` of each output channel.
    bias, zero_point : array_like of ints, optional
        int32 bias added to the accumulator; zero point added after rounding.
    out_dtype : {"int8", "uint8"}
    clip : (qmin, qmax), optional
    bits : int
        Multiplier precision, at most 31.
    """
    mult, shift = dyadic_from_scale(scale, bits, what="requant_from_scale")
    return Requant(
        jnp.asarray(mult, jnp.int32),
        jnp.asarray(shift, jnp.int32),
        None if bias is None else jnp.asarray(bias, jnp.int32),
        None if zero_point is None else jnp.asarray(zero_point, jnp.int32),
        out_dtype,
        None if clip is None else (int(clip[0]), int(clip[1])),
    )


def check_requant(rq: Requant, n: int) -> None:
    """Raise early, naming the value, when a Requant cannot apply to ``n`` output channels."""
    if not isinstance(rq, Requant):
        raise TypeError(f"out_scale must be a hqjax.kernels.Requant, got {type(rq).__name__}")
    if rq.out_dtype not in OUT_DTYPES:
        raise ValueError(f"Requant.out_dtype={rq.out_dtype!r}; use one of {OUT_DTYPES}")
    lo, hi, _ = _qrange(rq.out_dtype)
    if rq.clip is not None and not isinstance(rq.clip, tuple):
        raise TypeError(f"Requant.clip={rq.clip!r} must be a (qmin, qmax) tuple (static "
                        "metadata, hashed under jit)")
    if rq.clip is not None and not (len(rq.clip) == 2 and lo <= rq.clip[0] <= rq.clip[1] <= hi):
        raise ValueError(f"Requant.clip={rq.clip}; use (qmin, qmax) with "
                         f"{lo} <= qmin <= qmax <= {hi} for out_dtype {rq.out_dtype}")
    for name in ("multiplier", "shift", "bias", "zero_point"):
        x = getattr(rq, name)
        if x is None:
            continue
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise TypeError(f"Requant.{name} must be int32, got {jnp.result_type(x)}")
        if jnp.ndim(x) not in (0, 1) or (jnp.ndim(x) == 1 and jnp.shape(x)[0] != n):
            raise ValueError(
                f"Requant.{name} has shape {jnp.shape(x)}; use () or ({n},) for {n} output channels"
            )
    try:  # concrete values can be range-checked; traced ones are the caller's contract
        m = np.asarray(rq.multiplier, np.int64)
        s = np.asarray(rq.shift, np.int64)
    except Exception:  # noqa: BLE001 - jax tracers raise on conversion
        return
    if np.any(m < 0) or np.any(m > _INT_MAX):
        raise ValueError(f"Requant.multiplier must lie in [0, 2^31), got min {m.min()} "
                         f"max {m.max()}")
    if np.any(s < 1) or np.any(s > _MAX_SHIFT):
        raise ValueError(f"Requant.shift must lie in [1, {_MAX_SHIFT}], got min {s.min()} "
                         f"max {s.max()}")


def _mul_wide(a, m):
    """Signed 32 x non-negative 31-bit product as (hi, lo) int32 words: ``a*m = hi*2^32 + lo_u``.

    ``lo`` is the wrapped int32 product (its bits are the low word); ``hi`` is the high word
    from 16-bit halves (Hacker's Delight, Sec. 8-2, ``mulhs``), each partial product fitting
    in int32.
    """
    lo = a * m
    a1, a0 = a >> 16, a & 0xFFFF
    m1, m0 = m >> 16, m & 0xFFFF
    k0 = lax.shift_right_logical(a0 * m0, jnp.int32(16))
    t1 = a1 * m0 + k0
    t2 = a0 * m1 + (t1 & 0xFFFF)
    hi = a1 * m1 + (t1 >> 16) + (t2 >> 16)
    return hi, lo


def _qrange(out_dtype: str) -> tuple[int, int, Any]:
    return (-128, 127, jnp.int8) if out_dtype == "int8" else (0, 255, jnp.uint8)


def dyadic_round(acc, multiplier, shift):
    """``round(acc * multiplier / 2^shift)`` in int32 arithmetic, half away from zero.

    The integer core of HAWQ-V3's dyadic requantization (Yao et al., 2021, Eq. 6), shared by
    :func:`requantize` (every kernel epilogue) and ``hqjax.quant``'s integer executor. The
    62-bit product is carried as (high, low) int32 words, so no int64 is needed; results
    outside int32 saturate.

    Parameters
    ----------
    acc : int32 array
    multiplier, shift : int32 arrays broadcastable with ``acc`` (per channel on the last
        axis), ``0 <= multiplier < 2^31`` and ``1 <= shift <= 62`` (see
        :func:`dyadic_from_scale`).

    Returns
    -------
    int32 array of the broadcast shape.
    """
    acc, m, s = (jnp.asarray(v).astype(jnp.int32) for v in (acc, multiplier, shift))
    shape = jnp.broadcast_shapes(acc.shape, m.shape, s.shape)
    # lax shifts need equal ranks: broadcast the per-channel rows to the tile first.
    x, m, s = (jnp.broadcast_to(v, shape) for v in (acc, m, s))
    hi, lo = _mul_wide(x, m)
    one = jnp.int32(1)
    sign = jnp.int32(_INT_MIN)
    # Round half away from zero = floor((P + 2^(s-1) - [P < 0]) / 2^s): the -1 moves only
    # negative ties down. P < 0 exactly when its high word is. The constant lies in the low
    # word when s <= 32; otherwise it is (2^(s-33) - neg) * 2^32 + (-neg mod 2^32).
    neg = (hi < 0).astype(jnp.int32)
    r_lo = jnp.where(s <= 32, (one << jnp.clip(s - 1, 0, 31)) - neg, -neg)
    r_hi = jnp.where(s > 32, (one << jnp.clip(s - 33, 0, 31)) - neg, 0)
    lo = lo + r_lo
    carry = ((lo ^ sign) < (r_lo ^ sign)).astype(jnp.int32)  # unsigned lo < r_lo: wrapped
    hi = hi + carry + r_hi
    # s <= 31: the result straddles both words; saturate when it does not fit in int32.
    sa = jnp.clip(s, 1, 31)
    low_part = lax.shift_right_logical(lo, sa) | (hi << (32 - sa))
    fits = (hi >> sa) == (low_part >> 31)
    wide = jnp.where(fits, low_part, jnp.where(hi < 0, jnp.int32(_INT_MIN), jnp.int32(_INT_MAX)))
    # s >= 32: the low word only ever contributes to the floor, which the shift drops.
    narrow = hi >> jnp.clip(s - 32, 0, 31)
    return jnp.where(s <= 31, wide, narrow)


def requantize(acc, multiplier, shift, bias=None, zero_point=None, *, out_dtype: str = "int8",
               clip=None):
    """HAWQ-V3 dyadic requantization of an int32 accumulator, exactly, in int32 arithmetic.

    ``clip(round((acc + bias) * multiplier / 2^shift) + zero_point, qmin, qmax)``, rounding
    half away from zero (:func:`dyadic_round`); per-channel parameters broadcast against the
    last axis of ``acc``. Used verbatim inside the Pallas kernels' epilogues, so it uses only
    int32 elementwise operations they all lower.

    Parameters
    ----------
    acc : int32 array (..., N)
    multiplier, shift : int32 arrays broadcastable to ``acc`` (see :class:`Requant`)
    bias, zero_point : int32 arrays broadcastable to ``acc``, optional
    out_dtype : {"int8", "uint8"}
    clip : (qmin, qmax), optional
        Narrower than ``out_dtype``'s range, e.g. (0, 15) for 4-bit unsigned activations.

    Returns
    -------
    array of ``out_dtype`` with the shape of ``acc``.
    """
    qmin, qmax, dtype = _qrange(out_dtype)
    if clip is not None:
        qmin, qmax = int(clip[0]), int(clip[1])
    x = acc.astype(jnp.int32)
    if bias is not None:
        x = x + bias.astype(jnp.int32)
    q = dyadic_round(x, multiplier, shift)
    if zero_point is not None:
        # saturating add: q may be near the int32 limits when the clip would catch it anyway
        z = jnp.broadcast_to(jnp.asarray(zero_point).astype(jnp.int32), q.shape)
        q = jnp.clip(q, -(2**30), 2**30) + z
    return jnp.clip(q, qmin, qmax).astype(dtype)


def apply_requant(acc, rq: Requant | None):
    """``acc`` unchanged when ``rq`` is None, else :func:`requantize` with ``rq``'s fields."""
    if rq is None:
        return acc
    return requantize(acc, rq.multiplier, rq.shift, rq.bias, rq.zero_point,
                      out_dtype=rq.out_dtype, clip=rq.clip)


def out_dtype_of(rq: Requant | None):
    return jnp.int32 if rq is None else _qrange(rq.out_dtype)[2]


def requant_vectors(rq: Requant, n: int, n_padded: int):
    """(1, n_padded) int32 rows of multiplier, shift, bias and zero point for a kernel's
    epilogue blocks.

    Padded channels get shift 1 and multiplier 0 (a valid, unused requant).
    """
    def row(x, fill):
        x = jnp.broadcast_to(jnp.asarray(x if x is not None else 0).astype(jnp.int32), (n,))
        return jnp.pad(x, (0, n_padded - n), constant_values=fill)[None, :]

    return row(rq.multiplier, 0), row(rq.shift, 1), row(rq.bias, 0), row(rq.zero_point, 0)
