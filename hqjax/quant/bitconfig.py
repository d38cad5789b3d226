"""BitConfig: the plain-data per-layer precision that crosses from allocation to quantization.

A BitConfig is ``{layer_path: {"weight_bits": b, "act_bits": a}}`` keyed by the names of
``hqjax.blocks(params)`` (Flax module paths such as ``'conv1'`` or
``'stage2/block0/conv1'``). ``act_bits`` may be ``None`` (the layer's input stays in float). Layer ``i`` of a stacked
module (``nn.scan`` / ``nnx.scan`` over layers) is ``'<module path>[i]'``.
It is saved as JSON that a person can read and edit.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from hqjax._bits import ACT_BITS, WEIGHT_BITS
from hqjax._schema import read_json, stamp, unstamp

__all__ = ["validate_bit_config", "uniform_bit_config", "bit_width_arrays", "save_bit_config", "load_bit_config"]

_KEYS = ("weight_bits", "act_bits")


def _check_bits(layer: str, key: str, value, allowed) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"BitConfig layer {layer!r}: {key}={value!r} is not supported; "
                         f"use one of {list(allowed)}" + (" or None" if key == "act_bits" else ""))


def validate_bit_config(bit_config: Mapping, names: Iterable[str] | None = None) -> dict:
    """Check a BitConfig and return it as a plain ``dict`` with both keys in every entry.

    Parameters
    ----------
    bit_config : ``{layer_path: {"weight_bits": int, "act_bits": int | None}}``.
    names : the layer paths that exist (``hqjax.blocks(params).names`` or a ``Blocks``);
        an entry naming anything else raises.

    Raises
    ------
    ValueError : naming the offending layer and value (bits outside 2–8, unknown keys,
        unknown layer paths with the list of valid ones).
    """
    if not isinstance(bit_config, Mapping):
        raise TypeError(f"a BitConfig is a dict {{layer_path: {{'weight_bits': b, 'act_bits': a}}}}, "
                        f"got {type(bit_config).__name__}")
    out = {}
    for layer, entry in bit_config.items():
        if not isinstance(entry, Mapping) or "weight_bits" not in entry:
            raise ValueError(f"BitConfig layer {layer!r}: entry {entry!r} needs a 'weight_bits' key")
        extra = set(entry) - set(_KEYS)
        if extra:
            raise ValueError(f"BitConfig layer {layer!r}: unknown keys {sorted(extra)}; allowed: {list(_KEYS)}")
        _check_bits(layer, "weight_bits", entry["weight_bits"], WEIGHT_BITS)
        act = entry.get("act_bits")
        if act is not None:
            _check_bits(layer, "act_bits", act, ACT_BITS)
        out[str(layer)] = {"weight_bits": int(entry["weight_bits"]), "act_bits": None if act is None else int(act)}
    if names is not None:
        known = list(names)
        unknown = [k for k in out if k not in known]
        if unknown:
            raise ValueError(f"BitConfig names layers that do not exist: {unknown}; "
                             f"layer paths of this model are {known}")
    return out


def uniform_bit_config(names: Iterable[str], weight_bits: int, act_bits: int | None = 8) -> dict:
    """The same precision for every layer (``names``: a ``Blocks`` or its ``.names``)."""
    return validate_bit_config({n: {"weight_bits": weight_bits, "act_bits": act_bits} for n in names})


def bit_width_arrays(bit_config: Mapping) -> dict:
    """A BitConfig with its widths as int32 arrays, for the ``bit_widths`` argument of a
    quantized model's ``apply``/``calibrate`` and :func:`hqjax.init_qat_state`.

    The model's own BitConfig then fixes only which layers are quantized (and ``act_bits=None``
    layers stay float); the widths are ordinary inputs, so one compiled QAT step or evaluation
    serves every configuration of a sweep instead of compiling once per configuration.
    """
    import jax.numpy as jnp

    return {n: {k: None if v is None else jnp.asarray(v, jnp.int32) for k, v in e.items()}
            for n, e in validate_bit_config(bit_config).items()}


def check_bit_widths(bit_config: Mapping, bit_widths: Mapping) -> None:
    """``bit_widths`` must name the layers of ``bit_config`` with the same ``act_bits=None``
    layers (the model's structure); raises ``ValueError`` naming the difference."""
    if set(bit_widths) != set(bit_config):
        raise ValueError(f"bit_widths names layers {sorted(set(bit_widths) ^ set(bit_config))} that the quantized "
                         f"model's BitConfig does not (or the reverse); build it with "
                         f"hqjax.bit_width_arrays(config) over the same layers")
    for n, e in bit_config.items():
        if (e["act_bits"] is None) != (bit_widths[n].get("act_bits") is None):
            raise ValueError(f"bit_widths layer {n!r}: act_bits must be None exactly where the model's BitConfig "
                             f"has act_bits=None (float input); rebuild the quantized model for another pattern")


def save_bit_config(bit_config: Mapping, path: str | os.PathLike) -> None:
    """Write a validated BitConfig as indented JSON, stamped with its schema version
    (``hqjax._schema``: the keys ``schema``, ``schema_version`` and ``versions`` sit next to
    the layer entries)."""
    from hqjax._workdir import atomic_write_json

    cfg = validate_bit_config(unstamp(bit_config, "bit_config"))
    atomic_write_json(os.fspath(path), stamp("bit_config", cfg))  # never half-written


def load_bit_config(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict:
    """Read and validate a BitConfig written by :func:`save_bit_config` (or by hand).

    Raises
    ------
    ValueError : naming the file when it is missing, not JSON, of another schema, or an
        invalid BitConfig.
    """
    cfg = read_json(path, "bit_config")
    try:
        return validate_bit_config(cfg, names)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)!r}: {e}") from None
