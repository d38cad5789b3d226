"""Fake-quantization for Flax NNX models, through ``nnx.split`` / ``nnx.merge``.

- :func:`quantize_nnx_state` / :func:`quantize_nnx`: weight fake-quant. Splitting an NNX model
  gives a ``State`` whose pure-dict form has the same ``module/kernel`` paths as a Linen params
  tree, so :func:`hqjax.quantize_params` applies unchanged.
- :func:`quantize_nnx_model`: the NNX counterpart of :func:`hqjax.quantize_model` (weights
  *and* activations). NNX has no ``nn.intercept_methods``, so the model stays a pure function
  of explicit state: ``apply(params, rest, stats, x)`` merges the graph with fake-quantized
  kernels, puts an activation quantizer in front of every configured ``nnx.Linear`` /
  ``nnx.Conv`` / ``nnx.LinearGeneral`` of that ephemeral copy, and calls it. The ranges are a
  plain pytree ``{layer_path: {'input': {'min', 'max', 'count'}}}`` (the same layout as the
  Linen ``'quant_stats'`` collection) returned by ``calibrate`` and passed to ``apply``.

Conventions follow HAWQ-V3 (Yao et al. 2021): per-channel symmetric weights, activation ranges
from calibration, straight-through gradients (Bengio et al. 2013) for QAT.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from hqjax._nnx import NNXApply, from_nnx, stacked_layers, with_layer_hooks
from hqjax.quant.bitconfig import validate_bit_config
from hqjax.quant.calibration import Calibrator, get_calibrator, state_range
from hqjax.quant.quantizers import QuantSpec, fake_quant
from hqjax.quant.transform import (STATS, WeightSpecFn, _static_width_calibrator, _weight_specs, act_spec_for,
                                   _check_stacked_acts, per_channel_weights, quantize_params)

__all__ = ["quantize_nnx_state", "quantize_nnx", "QuantizedNNXModel", "quantize_nnx_model", "QuantizedNNXApply",
           "quantize_nnx_apply"]

PyTree = Any


def quantize_nnx_state(params_state, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights, *,
                       bit_widths: Mapping | None = None):
    """Fake-quantize the kernels of an ``nnx.State`` of parameters (``nnx.split(model, nnx.Param, ...)``).

    Pure and differentiable (straight-through gradient), so it belongs inside a loss:
    ``loss(params) = f(nnx.merge(graphdef, quantize_nnx_state(params, cfg), rest))``.
    """
    from flax import nnx

    state = jax.tree.map(lambda x: x, params_state)  # a copy: replace_by_pure_dict mutates in place
    nnx.replace_by_pure_dict(state, quantize_params(nnx.to_pure_dict(params_state), bit_config, weight_spec,
                                                    bit_widths=bit_widths))
    return state


def quantize_nnx(model, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights):
    """A new NNX model whose configured kernels are fake-quantized (the input model is unchanged)."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, quantize_nnx_state(params, bit_config, weight_spec), rest, copy=True)


def _check_no_acts_in_nnx_stacks(module, act_spec) -> None:
    """A layer stacked by ``nnx.vmap`` and applied under ``nnx.scan`` cannot record its input
    range per layer (the hook would leak the scan's tracers): refuse its act_bits by name."""
    stacked = [n for n in stacked_layers(module) if act_spec(n) is not None]
    if stacked:
        raise ValueError(f"layers {stacked} run stacked (nnx.vmap / nnx.scan) and have act_bits: their input "
                         f"ranges cannot be recorded per layer inside the scan; quantize only the weights of "
                         f"stacked layers (act_bits=None), naming each layer as hqjax.blocks(params, "
                         f"stacked=hqjax.stacked_modules(...)) does")


def _act_layer_types():
    from flax import nnx

    return (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)  # an embedding's input is token ids: never quantized


def _input_hooks(spec_for, calibrator, new_stats: dict, calibrate: bool, bit_widths=None):
    """``hook_for(name, layer)`` for :func:`hqjax._nnx.with_layer_hooks`: in calibration mode
    each quantized layer's input updates its range in ``new_stats``; frozen, it is
    fake-quantized with that range."""

    def hook_for(layer_name, _layer):
        spec = spec_for(layer_name)
        if spec is None:
            return None

        def hook(layer, x, *args, **kwargs):
            if calibrate:
                old = new_stats.get(layer_name, {}).get("input", calibrator.init())
                new_stats[layer_name] = {"input": calibrator.update(old, jax.lax.stop_gradient(x), spec)}
                return layer(x, *args, **kwargs)
            if layer_name not in new_stats:
                raise ValueError(f"layer {layer_name!r} has act_bits={spec.bits} but no calibrated input range "
                                 f"in the stats (which have {sorted(new_stats)}); calibrate on a few batches "
                                 f"first (or set act_bits=None for this layer)")
            bits = None if bit_widths is None else bit_widths[layer_name]["act_bits"]
            return layer(fake_quant(x, spec, state_range(new_stats[layer_name]["input"]), bits=bits), *args, **kwargs)

        return hook

    return hook_for


@dataclasses.dataclass(frozen=True)
class QuantizedNNXModel:
    """An NNX model with fake-quantized weights and calibrated activation quantizers.

    Build with :func:`quantize_nnx_model`; split the float model once with
    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` and keep ``params`` (float
    shadow weights, what QAT trains), ``rest`` (batch stats, RNG state) and ``stats`` (the
    activation ranges) as explicit state. Both methods are pure and jit-able.

    Attributes
    ----------
    graphdef : the float model's ``nnx.GraphDef``.
    bit_config : validated BitConfig.
    weight_spec : per-layer weight quantizer factory.
    act_mode : ``'asymmetric'`` (unsigned wherever the calibrated minimum is 0), ``'symmetric'``
        or ``'unsigned'``.
    calibrator : how calibration updates the ranges.
    """

    graphdef: Any
    bit_config: dict
    weight_spec: WeightSpecFn = per_channel_weights
    act_mode: str = "asymmetric"
    calibrator: Calibrator = dataclasses.field(default_factory=lambda: get_calibrator("minmax"))

    def act_spec(self, layer: str) -> QuantSpec | None:
        return act_spec_for(self.bit_config, layer, self.act_mode)

    def _run(self, params, rest, stats, args, kwargs, *, calibrate: bool, bit_widths=None):
        from flax import nnx

        if calibrate:
            _static_width_calibrator(self.calibrator, bit_widths)
        # copy=True: merge would otherwise alias the caller's Variables, and an eager call in
        # training mode would write BatchNorm statistics into the caller's model.
        qparams = quantize_nnx_state(params, self.bit_config, self.weight_spec, bit_widths=bit_widths)
        model = nnx.merge(self.graphdef, qparams, rest, copy=True)
        _check_no_acts_in_nnx_stacks(model, self.act_spec)
        new_stats = dict(stats or {})
        hooks = _input_hooks(self.act_spec, self.calibrator, new_stats, calibrate, bit_widths)
        with with_layer_hooks(model, hooks, _act_layer_types()):  # restored after, so split(model) matches `rest`
            out = model(*args, **kwargs)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return out, new_rest, new_stats

    def apply(self, params, rest, stats: Mapping, *args, mutable: bool = False, bit_widths: Mapping | None = None,
              **kwargs):
        """Frozen mode: fake-quantized weights, and each quantized layer's input fake-quantized
        with its calibrated range from ``stats``.

        Returns the model's output, or ``(output, new_rest)`` when ``mutable`` (the model
        updated non-parameter state, e.g. BatchNorm statistics in training mode). A layer
        with ``act_bits`` but no range in ``stats`` raises, naming the layer. ``bit_widths``
        (:func:`hqjax.bit_width_arrays`) replaces the BitConfig's widths with array inputs.
        """
        out, new_rest, _ = self._run(params, rest, stats, args, kwargs, calibrate=False, bit_widths=bit_widths)
        return (out, new_rest) if mutable else out

    def calibrate(self, params, rest, stats: Mapping | None, *args, bit_widths: Mapping | None = None,
                  **kwargs) -> dict:
        """Calibration mode: run with fake-quantized weights and float activations and return
        ``stats`` updated with every quantized layer's input range (``None`` starts fresh)."""
        return self._run(params, rest, stats, args, kwargs, calibrate=True, bit_widths=bit_widths)[2]

    def float_apply(self, params, rest, *args, **kwargs):
        """The full-precision model (teacher for distillation, reference for accuracy)."""
        from flax import nnx

        return nnx.merge(self.graphdef, params, rest, copy=True)(*args, **kwargs)


def quantize_nnx_model(model, bit_config: Mapping, *, weight_spec: WeightSpecFn = per_channel_weights,
                       act_mode: str = "asymmetric", calibrator: str | Calibrator = "minmax") -> QuantizedNNXModel:
    """Wrap a Flax NNX model for fake-quantized inference, calibration and QAT.

    The NNX counterpart of :func:`hqjax.quantize_model`: same BitConfig (layer paths are the
    ``'/'``-joined attribute paths, e.g. ``'conv1'``, ``'blocks/0/dense'``), same weight specs,
    activation modes and calibrators, and the same results for the same weights and data.

    Examples
    --------
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)   # doctest: +SKIP
    >>> qm = hqjax.quantize_nnx_model(model, cfg)                   # doctest: +SKIP
    >>> stats = jax.jit(qm.calibrate)(params, rest, None, x)        # doctest: +SKIP
    >>> logits = jax.jit(qm.apply)(params, rest, stats, x)          # doctest: +SKIP
    """
    from flax import nnx

    cfg = validate_bit_config(bit_config)
    _check_stacked_acts(cfg)
    if act_mode not in ("asymmetric", "symmetric", "unsigned"):
        raise ValueError(f"act_mode={act_mode!r}: use 'asymmetric' (unsigned wherever the calibrated minimum "
                         f"is 0, e.g. after ReLU), 'symmetric' or 'unsigned'")
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    _weight_specs(nnx.to_pure_dict(params), cfg, weight_spec)  # unknown layer paths raise now
    return QuantizedNNXModel(graphdef, cfg, weight_spec, act_mode, get_calibrator(calibrator))


@dataclasses.dataclass(frozen=True)
class QuantizedNNXApply:
    """An NNX model in Linen's convention (``hqjax.from_nnx``) with fake-quantized weights and
    calibrated activation quantizers: the same interface as :class:`hqjax.QuantizedModel`
    (``apply``, ``calibrate``, ``float_apply`` over a variables dict with a ``'quant_stats'``
    collection ``{layer_path: {'input': {'min', 'max', 'count'}}}``), so QAT
    (:func:`hqjax.make_qat_step`), the job and every other Linen-convention consumer run an
    NNX model unchanged. Build with :func:`quantize_nnx_apply` or ``hqjax.quantize_model``.
    """

    model: NNXApply
    bit_config: dict
    weight_spec: WeightSpecFn = per_channel_weights
    act_mode: str = "asymmetric"
    calibrator: Calibrator = dataclasses.field(default_factory=lambda: get_calibrator("minmax"))

    def act_spec(self, layer: str) -> QuantSpec | None:
        return act_spec_for(self.bit_config, layer, self.act_mode)

    def _run(self, variables, args, kwargs, *, train: bool, calibrate: bool, bit_widths=None):
        if calibrate:
            _static_width_calibrator(self.calibrator, bit_widths)
        qparams = quantize_params(variables["params"], self.bit_config, self.weight_spec, bit_widths=bit_widths)
        module = self.model.merge({k: v for k, v in variables.items() if k != STATS}, params=qparams)
        self.model.set_mode(module, train, kwargs.pop("rngs", None))
        _check_no_acts_in_nnx_stacks(module, self.act_spec)
        new_stats = dict(variables.get(STATS) or {})
        hooks = _input_hooks(self.act_spec, self.calibrator, new_stats, calibrate, bit_widths)
        with with_layer_hooks(module, hooks, _act_layer_types()):
            out = module(*args, **kwargs)
        return out, module, new_stats

    def apply(self, variables, *args, train: bool = False, mutable=False, bit_widths: Mapping | None = None,
              **kwargs):
        """Frozen mode: fake-quantized weights and activations with the calibrated ranges;
        ``(out, updated collections)`` when ``mutable`` (``['batch_stats']`` when ``train``);
        ``bit_widths`` as in :meth:`hqjax.QuantizedModel.apply`."""
        out, module, _ = self._run(variables, args, kwargs, train=train, calibrate=False, bit_widths=bit_widths)
        return (out, self.model.collect(module, mutable)) if mutable else out

    def calibrate(self, variables, *args, train: bool = False, bit_widths: Mapping | None = None, **kwargs) -> dict:
        """Calibration mode: ``variables`` with every quantized layer's input range updated."""
        _, _, stats = self._run(variables, args, kwargs, train=train, calibrate=True, bit_widths=bit_widths)
        return {**variables, STATS: stats}

    def float_apply(self, variables, *args, train: bool = False, mutable=False, **kwargs):
        """The full-precision model (teacher for distillation, reference for accuracy)."""
        variables = {k: v for k, v in variables.items() if k != STATS}
        return self.model.apply(variables, *args, train=train, mutable=mutable, **kwargs)


def quantize_nnx_apply(model, bit_config: Mapping, *, weight_spec: WeightSpecFn = per_channel_weights,
                       act_mode: str = "asymmetric", calibrator: str | Calibrator = "minmax") -> QuantizedNNXApply:
    """:class:`QuantizedNNXApply` of an NNX module or of ``hqjax.from_nnx``'s model.

    Examples
    --------
    >>> model, variables = hqjax.from_nnx(nnx_module)                # doctest: +SKIP
    >>> qm = hqjax.quantize_model(model, cfg)                       # doctest: +SKIP
    >>> variables = jax.jit(qm.calibrate)(variables, x)             # doctest: +SKIP
    >>> logits = jax.jit(qm.apply)(variables, x)                    # doctest: +SKIP
    """
    model, variables = from_nnx(model)
    cfg = validate_bit_config(bit_config)
    _check_stacked_acts(cfg)
    if act_mode not in ("asymmetric", "symmetric", "unsigned"):
        raise ValueError(f"act_mode={act_mode!r}: use 'asymmetric' (unsigned wherever the calibrated minimum "
                         f"is 0, e.g. after ReLU), 'symmetric' or 'unsigned'")
    _weight_specs(variables["params"], cfg, weight_spec)  # unknown layer paths raise now
    return QuantizedNNXApply(model, cfg, weight_spec, act_mode, get_calibrator(calibrator))
