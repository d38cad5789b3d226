"""Export a BitConfig as Qwix ``QuantizationRule``s, so a HAWQ allocation can be served with Qwix.

Qwix (github.com/google/qwix) picks, for each op, the first rule whose ``module_path`` regex
``re.fullmatch``-es the ``'/'``-joined Flax module path: the same strings as hqjax's layer
names. One rule per layer, with the layer path escaped, reproduces the per-layer precision
exactly; Qwix's integer types are ``int2``/``int4``/``int8``, so other widths are rounded up
(and reported) unless ``strict=True``. Q-BERT's output-row groups have no Qwix counterpart
(Qwix's ``tile_size`` tiles the contraction axis) and are not exported.

:func:`export_qwix` makes rules that Qwix's providers accept and run on what ``hqjax run``
allocates (mixed weight widths, 8-bit activations), and says what it changed where Qwix
cannot express a setting. What Qwix 0.1.8 accepts (found by running each provider on each
kind of layer; ``tests/quant/test_qwix_export.py`` re-checks it):

- a Dense/DenseGeneral layer may mix weight and activation types (int4 weights, int8
  inputs) under both providers;
- a convolution may not: ``QtProvider`` refuses ``int4`` weights with ``int8`` inputs
  (``lax.conv_general_dilated`` needs equal operand types) but runs weight-only
  quantization; ``PtqProvider`` needs equal ``act_qtype`` and ``weight_qtype`` and has no
  weight-only convolution.

So a convolution whose weight and activation types differ is exported, under ``'qt'``, with
its weight type and float inputs (weight-only: the allocated weight width, which is what
the allocation bought, is kept, and float inputs lose nothing against hqjax's 8-bit ones);
under ``'ptq'``, with both operands at the wider type (narrowing 8-bit inputs to 4 bits
would cost accuracy the allocation never accounted for, and XLA:CPU/GPU run no ``int4``
convolution). Both are listed in :attr:`QwixExport.changes` and logged as a warning.
Activation scales are dynamic (Qwix's default on XLA) unless ``act_static_scale=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Mapping, Sequence

from hqjax.quant.bitconfig import validate_bit_config
from hqjax.tree import stack_layer

__all__ = ["qwix_rule_specs", "to_qwix_rules", "QwixChange", "QwixExport", "export_qwix", "qwix_apply"]

logger = logging.getLogger("hqjax")

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


def _widest(bits: list) -> int | None:
    return None if any(b is None for b in bits) else max(bits)


def _merge_stacks(cfg: Mapping) -> tuple[dict, list[tuple[str, tuple, tuple]]]:
    """One entry per module path: the layers of a stack (``'stack/fc[i]'``) run under one
    Qwix rule (Qwix matches module paths, and a scanned layer has one), at the widest
    widths allocated to any of them (``None``, float, is widest). Returns the merged config
    and ``(layer, allocated, merged)`` for each stack layer whose widths went up."""
    merged: dict = {}
    layers: dict[str, list[str]] = {}
    for name, entry in cfg.items():
        module, j = stack_layer(name)
        if j is None:
            merged[name] = dict(entry)
        else:
            layers.setdefault(module, []).append(name)
    raised = []
    for module, names in layers.items():
        wide = {k: _widest([cfg[n][k] for n in names]) for k in ("weight_bits", "act_bits")}
        merged[module] = wide
        raised += [(n, (cfg[n]["weight_bits"], cfg[n]["act_bits"]), (wide["weight_bits"], wide["act_bits"]))
                   for n in names if (cfg[n]["weight_bits"], cfg[n]["act_bits"]) != tuple(wide.values())]
    return merged, raised


def qwix_rule_specs(bit_config: Mapping, *, strict: bool = False,
                    act_static_scale: bool = True) -> tuple[list[dict], list[tuple]]:
    """Plain-data Qwix rules: ``([{'module_path', 'weight_qtype', 'act_qtype', ...}], rounded)``.

    ``rounded`` lists ``(layer, key, bits, exported_bits)`` for widths Qwix cannot represent,
    and for the layers of a stack raised to the widest width of the stack (one rule per
    module path). Rules are ordered longest path first, and each path is escaped and
    anchored, so one layer's rule never captures another's (``'conv1'`` vs ``'conv10'``).
    """
    cfg, raised = _merge_stacks(validate_bit_config(bit_config))
    rounded: list[tuple] = [(n, k, a, b) for n, alloc, wide in raised
                            for k, a, b in zip(("weight_bits", "act_bits"), alloc, wide) if a != b]
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


def _import_qwix():
    try:
        import qwix
    except ImportError as e:
        raise ImportError("exporting a BitConfig to Qwix needs Qwix: pip install qwix "
                          "(hqjax.qwix_rule_specs gives the same rules as plain dicts without it)") from e
    return qwix


def to_qwix_rules(bit_config: Mapping, *, strict: bool = False, act_static_scale: bool = True) -> list:
    """``qwix.QuantizationRule``s for a BitConfig (use with ``qwix.PtqProvider`` / ``QtProvider``).

    Raises
    ------
    ImportError : when Qwix is not installed (``pip install qwix``).
    """
    qwix = _import_qwix()
    specs, _ = qwix_rule_specs(bit_config, strict=strict, act_static_scale=act_static_scale)
    return [qwix.QuantizationRule(**s) for s in specs]


@dataclasses.dataclass(frozen=True)
class QwixChange:
    """One layer whose exported setting differs from the allocation.

    Attributes
    ----------
    layer : the layer path.
    allocated : ``(weight_bits, act_bits)`` in the BitConfig.
    exported : ``(weight_qtype, act_qtype)`` in the Qwix rule (``None``: float).
    action : ``'round_up'``, ``'weight_only'``, ``'widen'``, ``'per_channel'`` or ``'stack'``
        (a layer of a stack raised to the stack's widest widths).
    reason : why, in one sentence.
    """

    layer: str
    allocated: tuple
    exported: tuple
    action: str
    reason: str


@dataclasses.dataclass(frozen=True)
class QwixExport:
    """Rules for one Qwix provider and what the export changed (see :func:`export_qwix`).

    ``specs`` are plain dicts (``qwix.QuantizationRule`` keyword arguments), ``changes`` one
    :class:`QwixChange` per adapted layer setting.
    """

    provider: str
    specs: tuple[dict, ...]
    changes: tuple[QwixChange, ...]

    def rules(self) -> list:
        """``qwix.QuantizationRule``s (needs Qwix)."""
        qwix = _import_qwix()
        return [qwix.QuantizationRule(**s) for s in self.specs]

    def make_provider(self):
        """``qwix.QtProvider`` or ``qwix.PtqProvider`` with these rules."""
        qwix = _import_qwix()
        return (qwix.QtProvider if self.provider == "qt" else qwix.PtqProvider)(self.rules())

    def to_dict(self) -> dict:
        return {"provider": self.provider, "specs": [dict(s) for s in self.specs],
                "changes": [dataclasses.asdict(c) for c in self.changes]}


def _qtype_of(bits: int | None, layer: str, key: str, changes: list, allocated, strict: bool) -> str | None:
    if bits is None:
        return None
    wider = [b for b in QWIX_BITS if b >= bits]
    if bits in QWIX_BITS:
        return f"int{bits}"
    if strict or not wider:
        raise ValueError(f"layer {layer!r}: {key}={bits} has no Qwix integer type ({list(QWIX_BITS)})"
                         + ("" if not wider else f"; pass strict=False to round up to int{wider[0]}"))
    changes.append(QwixChange(layer, allocated, (), "round_up",
                              f"{key}={bits} has no Qwix type; rounded up to int{wider[0]}"))
    return f"int{wider[0]}"


def export_qwix(bit_config: Mapping, kinds: Mapping[str, Any], *, provider: str = "ptq", strict: bool = False,
                act_static_scale: bool = False, grouped_layers: Sequence[str] = ()) -> QwixExport:
    """Qwix rules for a HAWQ allocation that ``provider`` accepts and runs.

    Parameters
    ----------
    bit_config : ``{layer: {'weight_bits', 'act_bits'}}`` (what ``hqjax run`` allocates).
    kinds : ``{layer: kind}`` with kind ``'conv'``, ``'dense'``, ``'dense_general'`` or
        ``'embed'``, or ``hqjax.layer_shapes(model, variables, x, train=False)`` (its
        ``LayerShape.kind``): convolutions need the adaptation the module docstring describes.
    provider : ``'ptq'`` (``qwix.PtqProvider``: integer weights for serving) or ``'qt'``
        (``qwix.QtProvider``: fake quantization for QAT).
    strict : refuse widths Qwix lacks instead of rounding them up.
    act_static_scale : calibrated activation scales (Qwix's ``quant_stats``) instead of
        dynamic ones.
    grouped_layers : layers quantized with Q-BERT's output-row groups
        (``hqjax.group_wise_weights``); Qwix has no such scales, so these get Qwix's
        per-output-channel scales, reported as a change.

    Returns
    -------
    QwixExport : the rules (longest path first, each path escaped and anchored) and the
    list of changes, also logged as one warning.
    """
    if provider not in ("ptq", "qt"):
        raise ValueError(f"provider={provider!r}: use 'ptq' (qwix.PtqProvider) or 'qt' (qwix.QtProvider)")
    cfg = validate_bit_config(bit_config)
    kind_of = {n: getattr(k, "kind", k) for n, k in kinds.items()}
    missing = [n for n in cfg if n not in kind_of]
    if missing:
        raise ValueError(f"no layer kind for {missing}; pass kinds=hqjax.layer_shapes(model, variables, x, "
                         f"train=False) or {{layer: 'conv' | 'dense' | ...}}")
    kind_of.update({stack_layer(n)[0]: kind_of[n] for n in cfg})
    cfg, raised = _merge_stacks(cfg)
    changes: list[QwixChange] = [
        QwixChange(n, alloc, (), "stack", f"Qwix has one rule per module path, and the layers of a stack share "
                                          f"{stack_layer(n)[0]!r}: raised to the stack's widest W{wide[0]}A{wide[1]}")
        for n, alloc, wide in raised]
    specs = []
    for layer in sorted(cfg, key=lambda n: (-len(n), n)):
        w_bits, a_bits = cfg[layer]["weight_bits"], cfg[layer]["act_bits"]
        allocated = (w_bits, a_bits)
        weight = _qtype_of(w_bits, layer, "weight_bits", changes, allocated, strict)
        act = _qtype_of(a_bits, layer, "act_bits", changes, allocated, strict)
        if kind_of[layer] == "conv" and weight is not None and act != weight:
            if provider == "qt":
                changes.append(QwixChange(layer, allocated, (weight, None), "weight_only",
                                          f"Qwix's QtProvider cannot run a {weight} convolution on {act} inputs; "
                                          f"kept {weight} weights and left the inputs in float"))
                act = None
            else:
                wide = weight if act is None else max(weight, act, key=lambda t: int(t[3:]))
                changes.append(QwixChange(layer, allocated, (wide, wide), "widen",
                                          f"Qwix's PtqProvider needs equal weight and input types in a "
                                          f"convolution and has no weight-only one; both set to {wide}"))
                weight = act = wide
        if layer in grouped_layers:
            changes.append(QwixChange(layer, allocated, (weight, act), "per_channel",
                                      "Qwix has no output-row group scales (Q-BERT); per-output-channel scales"))
        spec = {"module_path": re.escape(layer), "weight_qtype": weight, "act_qtype": act,
                "weight_calibration_method": "absmax"}
        if act is not None:
            spec["act_static_scale"] = act_static_scale
        specs.append(spec)
    for c in changes:
        if not c.exported:
            exported = next(s for s in specs if s["module_path"] == re.escape(stack_layer(c.layer)[0]))
            changes[changes.index(c)] = dataclasses.replace(c, exported=(exported["weight_qtype"],
                                                                         exported["act_qtype"]))
    if changes:
        logger.warning("Qwix %s export changed %d layer setting(s): %s", provider, len(changes),
                       "; ".join(f"{c.layer}: W{c.allocated[0]}A{c.allocated[1]} -> {c.exported} ({c.action})"
                                 for c in changes))
    return QwixExport(provider, tuple(specs), tuple(changes))


def _ptq_params(qwix, params, abstract):
    """``qwix.quantize_params``, layer by layer through a stack: Qwix derives a weight's
    quantization from the slice a scanned layer sees (its channel axes count from the
    slice), so a stacked kernel is quantized one layer at a time and the results stacked,
    giving the per-layer scales the scanned model reads."""
    import flax
    import jax

    out = {}
    for path, w in flax.traverse_util.flatten_dict(params).items():
        a = abstract
        for k in path:
            a = a[k]
        q = qwix.quantize_params({"w": w}, {"w": a})["w"]
        if hasattr(a, "how") and jax.tree.map(jax.numpy.shape, q.array) != jax.tree.map(jax.numpy.shape, a.array):
            layer = a.replace(array=jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), a.array))
            q = jax.vmap(lambda x: qwix.quantize_params({"w": x}, {"w": layer})["w"])(w)
        out[path] = q
    return flax.traverse_util.unflatten_dict(out)


def qwix_apply(model, variables, export: QwixExport, sample_input, **kwargs) -> Callable:
    """Serve a model through Qwix with an export: ``fn(x) -> outputs``.

    ``model`` is a Linen module (with its ``variables``), an NNX module (``variables``
    ``None`` for the weights it holds, or ``hqjax.from_nnx``-style variables to load into a
    copy), or the :class:`hqjax.NNXApply` that :func:`hqjax.from_nnx` made of one. Under ``'ptq'`` the float weights are converted once to Qwix's quantized params
    (integer weights and their scales), so the served model holds integer weights; under
    ``'qt'`` they are fake-quantized in each call. ``kwargs`` go to a Linen ``apply`` (e.g.
    ``train=False``); an NNX module is called in eval mode.
    """
    import jax

    from hqjax._linen import with_train_arg
    from hqjax._nnx import NNXApply, from_nnx, is_nnx_module

    qwix = _import_qwix()
    if is_nnx_module(model) or isinstance(model, NNXApply):
        nnx_model, own = (model, None) if isinstance(model, NNXApply) else from_nnx(model)
        if variables is None and own is None:
            raise ValueError("qwix_apply of an NNXApply needs its variables (from_nnx returned them beside it)")
        module = nnx_model.merge(own if variables is None else variables)
        module.eval()
        served = qwix.quantize_model(module, export.make_provider(), sample_input)
        return lambda x: served(x)
    model = with_train_arg(model) if "train" in kwargs else model
    qmodel = qwix.quantize_model(model, export.make_provider())
    variables = jax.tree.map(jax.numpy.asarray, dict(variables))  # Qwix finds weights by identity
    if export.provider == "ptq":
        abstract = jax.eval_shape(lambda x: qmodel.init(jax.random.key(0), x, **kwargs), sample_input)
        variables = {**variables, "params": _ptq_params(qwix, variables["params"], abstract["params"])}
    return jax.jit(lambda x: qmodel.apply(variables, x, **kwargs))
