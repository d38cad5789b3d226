"""The bit-width policy: which widths a layer's weights and activations may take.

One source of truth for the configuration check (``hqjax.config``), the commands, the
BitConfig validator (``hqjax.quant.bitconfig``) and the quantizers (``QuantSpec``), so a
width that cannot be quantized is refused when the settings are read, not after training.

Weights: 2 to 8 bits (HAWQ-V3's integer kernels store them in int8). Activations: 2 to 8
bits, or 16 (residual paths kept wide); ``None`` in a BitConfig leaves a layer's input in
float. Activations default to 8 bits everywhere (``allocate``, ``hqjax run``,
``python -m hqjax.alloc``); activation bits that follow the weight bits are an explicit
choice (``act_candidates='weights'``).
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["WEIGHT_BITS", "ACT_BITS", "DEFAULT_ACT_BITS", "bad_weight_bits", "bad_act_bits"]

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
DEFAULT_ACT_BITS = 8


def _bad(bits: Iterable, allowed) -> list:
    return [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or b not in allowed]


def bad_weight_bits(bits: Iterable) -> list:
    """The entries of ``bits`` that are not supported weight widths (empty when all are)."""
    return _bad(bits, WEIGHT_BITS)


def bad_act_bits(bits: Iterable) -> list:
    """The entries of ``bits`` that are not supported activation widths."""
    return _bad(bits, ACT_BITS)
