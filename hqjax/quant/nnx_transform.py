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

from hqjax.quant.bitconfig import validate_bit_config
from hqjax.quant.calibration import Calibrator, get_calibrator, state_range
from hqjax.quant.quantizers import QuantSpec, fake_quant
from hqjax.quant.transform import WeightSpecFn, _weight_specs, act_spec_for, per_channel_weights, quantize_params

__all__ = ["quantize_nnx_state", "quantize_nnx", "QuantizedNNXModel", "quantize_nnx_model"]

PyTree = Any


def quantize_nnx_state(params_state, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights):
    """Fake-quantize the kernels of an ``nnx.State`` of parameters (``nnx.split(model, nnx.Param, ...)``).

    Pure and differentiable (straight-through gradient), so it belongs inside a loss:
    ``loss(params) = f(nnx.merge(graphdef, quantize_nnx_state(params, cfg), rest))``.
    """
    from flax import nnx

    state = jax.tree.map(lambda x: x, params_state)  # a copy: replace_by_pure_dict mutates in place
    nnx.replace_by_pure_dict(state, quantize_params(nnx.to_pure_dict(params_state), bit_config, weight_spec))
    return state


def quantize_nnx(model, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights):
    """A new NNX model whose configured kernels are fake-quantized (the input model is unchanged)."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, quantize_nnx_state(params, bit_config, weight_spec), rest, copy=True)


def _layer_types():
    from flax import nnx

    return (nnx.Linear, nnx.Conv, nnx.LinearGeneral)


def _quantized_layers(model, bit_config) -> list[tuple[tuple, str]]:
    """``[(graph_path, layer_name)]`` of the layers whose input gets an activation quantizer."""
    from flax import nnx

    out = []
    for path, node in nnx.iter_graph(model):
        name = "/".join(str(k) for k in path)
        if isinstance(node, _layer_types()) and bit_config.get(name, {}).get("act_bits") is not None:
            out.append((path, name))
    return out


def _get(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set(node, key, value):
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)


def _with_input_hook(layer, hook):
    """An NNX module that calls ``layer(hook(x), ...)`` (built lazily: flax imports on use)."""
    from flax import nnx

    class _InputHooked(nnx.Module):
        def __init__(self, layer, hook):
            self.layer = layer
            self.hook = hook  # a plain function: static, never part of the split state

        def __call__(self, x, *args, **kwargs):
            return self.layer(self.hook(x), *args, **kwargs)

    return _InputHooked(layer, hook)


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

    def _run(self, params, rest, stats, args, kwargs, *, calibrate: bool):
        from flax import nnx

        # copy=True: merge would otherwise alias the caller's Variables, and an eager call in
        # training mode would write BatchNorm statistics into the caller's model.
        model = nnx.merge(self.graphdef, quantize_nnx_state(params, self.bit_config, self.weight_spec), rest,
                          copy=True)
        new_stats = dict(stats or {})
        swapped = []

        def hook_for(layer):
            spec = self.act_spec(layer)

            def hook(x):
                if calibrate:
                    old = new_stats.get(layer, {}).get("input", self.calibrator.init())
                    new_stats[layer] = {"input": self.calibrator.update(old, jax.lax.stop_gradient(x), spec)}
                    return x
                if layer not in new_stats:
                    raise ValueError(f"layer {layer!r} has act_bits={spec.bits} but no calibrated input range "
                                     f"in stats (which has {sorted(new_stats)}); run "
                                     f"QuantizedNNXModel.calibrate on a few batches first "
                                     f"(or set act_bits=None for this layer)")
                return fake_quant(x, spec, state_range(new_stats[layer]["input"]))

            return hook

        for path, layer in _quantized_layers(model, self.bit_config):
            parent = model
            for key in path[:-1]:
                parent = _get(parent, key)
            original = _get(parent, path[-1])
            _set(parent, path[-1], _with_input_hook(original, hook_for(layer)))
            swapped.append((parent, path[-1], original))
        out = model(*args, **kwargs)
        for parent, key, original in swapped:  # restore the graph so that split(model) matches `rest`
            _set(parent, key, original)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return out, new_rest, new_stats

    def apply(self, params, rest, stats: Mapping, *args, mutable: bool = False, **kwargs):
        """Frozen mode: fake-quantized weights, and each quantized layer's input fake-quantized
        with its calibrated range from ``stats``.

        Returns the model's output, or ``(output, new_rest)`` when ``mutable`` (the model
        updated non-parameter state, e.g. BatchNorm statistics in training mode). A layer
        with ``act_bits`` but no range in ``stats`` raises, naming the layer.
        """
        out, new_rest, _ = self._run(params, rest, stats, args, kwargs, calibrate=False)
        return (out, new_rest) if mutable else out

    def calibrate(self, params, rest, stats: Mapping | None, *args, **kwargs) -> dict:
        """Calibration mode: run with fake-quantized weights and float activations and return
        ``stats`` updated with every quantized layer's input range (``None`` starts fresh)."""
        return self._run(params, rest, stats, args, kwargs, calibrate=True)[2]

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
    if act_mode not in ("asymmetric", "symmetric", "unsigned"):
        raise ValueError(f"act_mode={act_mode!r}: use 'asymmetric' (unsigned wherever the calibrated minimum "
                         f"is 0, e.g. after ReLU), 'symmetric' or 'unsigned'")
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    _weight_specs(nnx.to_pure_dict(params), cfg, weight_spec)  # unknown layer paths raise now
    return QuantizedNNXModel(graphdef, cfg, weight_spec, act_mode, get_calibrator(calibrator))
