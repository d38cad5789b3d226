"""Export a BitConfig as Qwix ``QuantizationRule``s, so a HAWQ allocation can be served with Qwix.

Qwix (github.com/google/qwix) picks, for each op, the first rule whose ``module_path`` regex
``re.fullmatch``-es the ``'/'``-joined Flax module path: the same strings as hqjax's layer
names. One rule per layer, with the layer path escaped, reproduces the per-layer precision
exactly; Qwix's integer types are ``int2``/``int4``/``int8``, so other widths are rounded up
(and reported) unless ``strict=True``. Q-BERT's output-row groups have no Qwix counterpart
(Qwix's ``tile_size`` tiles the contraction axis) and are not exported.
"""

from __future__ import annotations

import re
from typing import Mapping

from hqjax.quant.bitconfig import validate_bit_config

__all__ = ["qwix_rule_specs", "to_qwix_rules"]

QWIX_BITS = (2, 4, 8)


def _qtype(layer: str, key: str, bits: int | None, strict: bool, rounded: list) -> str | None:
    if bits is None:
        return None
    supported = [b for b in QWIX_BITS if b >= bits]
    if bits not in QWIX_BITS:
        if strict or not supported:
            raise ValueError(f"layer {layer!r}: {key}={bits} has no Qwix integer type ({list(QWIX_BITS)}); "
                             f"pass strict=False to round up to int{supported[0] if supported else 8}")
        rounded.append((layer, key, bits, supported[0]))
        bits = supported[0]
    return f"int{bits}"


def qwix_rule_specs(bit_config: Mapping, *, strict: bool = False,
                    act_static_scale: bool = True) -> tuple[list[dict], list[tuple]]:
    """Plain-data Qwix rules: ``([{'module_path', 'weight_qtype', 'act_qtype', ...}], rounded)``.

    ``rounded`` lists ``(layer, key, bits, exported_bits)`` for widths Qwix cannot represent.
    Rules are ordered longest path first, and each path is escaped and anchored, so one
    layer's rule never captures another's (``'conv1'`` vs ``'conv10'``).
    """
    cfg = validate_bit_config(bit_config)
    rounded: list[tuple] = []
    specs = []
    for layer in sorted(cfg, key=lambda n: (-len(n), n)):
        entry = cfg[layer]
        weight = _qtype(layer, "weight_bits", entry["weight_bits"], strict, rounded)
        act = _qtype(layer, "act_bits", entry["act_bits"], strict, rounded)
        spec = {"module_path": re.escape(layer), "weight_qtype": weight, "act_qtype": act,
                "weight_calibration_method": "absmax"}
        if act is not None:
            spec["act_static_scale"] = act_static_scale
        specs.append(spec)
    return specs, rounded


def to_qwix_rules(bit_config: Mapping, *, strict: bool = False, act_static_scale: bool = True) -> list:
    """``qwix.QuantizationRule``s for a BitConfig (use with ``qwix.PtqProvider`` / ``QtProvider``).

    Raises
    ------
    ImportError : when Qwix is not installed (``pip install qwix``).
    """
    try:
        import qwix
    except ImportError as e:
        raise ImportError("exporting a BitConfig to Qwix needs Qwix: pip install qwix "
                          "(hqjax.qwix_rule_specs gives the same rules as plain dicts without it)") from e
    specs, _ = qwix_rule_specs(bit_config, strict=strict, act_static_scale=act_static_scale)
    return [qwix.QuantizationRule(**s) for s in specs]
