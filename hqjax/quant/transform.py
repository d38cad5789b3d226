"""Flax transforms: a params pytree or a Linen model plus a BitConfig -> a fake-quantized one.

- :func:`quantize_params` fake-quantizes the kernel (or embedding) of every layer named in a
  BitConfig, with the straight-through estimator, leaving every other leaf untouched.
- :func:`quantize_model` wraps a Linen model so that every ``nn.Dense``/``nn.Conv``/
  ``nn.DenseGeneral``/``nn.Embed`` call sees fake-quantized weights, and every quantized
  layer's input goes through an activation quantizer whose range lives in the
  ``'quant_stats'`` collection (calibration mode collects it, frozen mode uses it). The
  models themselves stay plain Flax: the wrapper works through ``nn.intercept_methods``.

Conventions follow HAWQ-V3 (Yao et al. 2021): per-channel symmetric weights, activation
ranges from calibration, unsigned ranges after ReLU (here: an asymmetric quantizer whose
calibrated minimum is 0, which is exactly the unsigned quantizer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from hqjax._linen import with_train_arg
from hqjax.quant.bitconfig import check_bit_widths, validate_bit_config
from hqjax.quant.calibration import Calibrator, get_calibrator, state_range
from hqjax.quant.quantizers import QuantSpec, fake_quant
from hqjax.tree import OWNER_LEAVES, kernel_view_shape, path_name, stack_layer

__all__ = [
    "per_channel_weights",
    "group_wise_weights",
    "Coverage",
    "coverage",
    "quantize_params",
    "weight_specs",
    "QuantizedModel",
    "quantize_model",
    "STATS",
]

PyTree = Any
WeightSpecFn = Callable[[str, str, tuple, int], QuantSpec]
STATS = "quant_stats"
_LAYERS = (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum, nn.Embed)


# --------------------------------------------------------------------------- weight specs
def per_channel_weights(layer: str, leaf: str, shape: tuple, bits: int) -> QuantSpec:
    """HAWQ-V3's default: symmetric, one scale per output channel (the last axis of the
    kernel's view: every ``(head, dim)`` feature of an attention projection); one scale per
    row of an embedding table (one per token)."""
    del layer
    return QuantSpec(bits=bits, mode="symmetric", axis=0 if leaf == "embedding" else -1)


def group_wise_weights(group_size: int, layers: Callable[[str], bool] | None = None,
                       fallback: WeightSpecFn = per_channel_weights) -> WeightSpecFn:
    """Q-BERT's group-wise quantization (Shen et al. 2020, Sec. 3.2): consecutive
    ``group_size`` output columns of a kernel share one symmetric scale (``group_size`` =
    head dimension: one group per attention head; a divisor of it: sub-groups in a head).

    ``layers`` selects the layers (by path) that are grouped; the others use ``fallback``.
    """
    def spec(layer, leaf, shape, bits):
        if leaf == "kernel" and (layers is None or layers(layer)) and shape[-1] % group_size == 0:
            return QuantSpec(bits=bits, mode="symmetric", axis=-1, group_size=group_size)
        return fallback(layer, leaf, shape, bits)

    return spec


# --------------------------------------------------------------------------- params
@dataclasses.dataclass(frozen=True)
class Coverage:
    """Which BitConfig entries matched a quantizable layer, which matched nothing, and which
    quantizable layers (modules owning a kernel/embedding) the config leaves in float."""

    matched: tuple[str, ...]
    unmatched: tuple[str, ...]
    uncovered: tuple[str, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _owner_leaves(params: PyTree) -> dict[str, tuple[str, str]]:
    """``{layer_path: (leaf_path, leaf_name)}`` for every kernel/embedding leaf."""
    out = {}
    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(p)
        if "/" in name and name.rsplit("/", 1)[1] in OWNER_LEAVES:
            layer, leaf = name.rsplit("/", 1)
            out.setdefault(layer, (name, leaf))
    return out


def coverage(params: PyTree, bit_config: Mapping) -> Coverage:
    """Match a BitConfig against the quantizable layers of ``params`` (a stacked module is
    covered when the config names it or any of its layers, ``'stack/fc[i]'``)."""
    owners = _owner_leaves(params)
    cfg = validate_bit_config(bit_config)
    named = {stack_layer(k)[0] for k in cfg}
    return Coverage(
        matched=tuple(k for k in cfg if stack_layer(k)[0] in owners),
        unmatched=tuple(k for k in cfg if stack_layer(k)[0] not in owners),
        uncovered=tuple(k for k in owners if k not in named),
    )


def _weight_specs(params, bit_config, weight_spec) -> dict[str, list[tuple[str, str, int, int | None]]]:
    """``{leaf_path: [(layer, leaf_name, bits, slice)]}``: ``slice`` is ``None`` for a whole
    kernel, else the layer of a stacked kernel (``'stack/fc[i]'``)."""
    owners = _owner_leaves(params)
    cfg = validate_bit_config(bit_config)
    unknown = [k for k in cfg if stack_layer(k)[0] not in owners]
    if unknown:
        raise ValueError(f"BitConfig entries {unknown} match no layer with a kernel or embedding; "
                         f"quantizable layers are {list(owners)}")
    shapes = {path_name(p): jnp.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    out: dict[str, list] = {}
    for k in cfg:
        module, j = stack_layer(k)
        lp, leaf = owners[module]
        if j is not None and not (len(shapes[lp]) > 2 and j < shapes[lp][0]):
            raise ValueError(f"BitConfig entry {k!r}: {lp} has shape {shapes[lp]}, which has no layer {j} along a "
                             f"leading layer axis; name layers of a stack as hqjax.blocks(params, stacked=...) does")
        out.setdefault(lp, []).append((k, leaf, cfg[k]["weight_bits"], j))
    for lp, entries in out.items():
        if len(entries) > 1 and any(j is None for *_, j in entries):
            raise ValueError(f"BitConfig names both the stack {stack_layer(entries[0][0])[0]!r} and its layers "
                             f"({[e[0] for e in entries]}); name either the whole stack or each layer")
    return out


def _view_shapes(params, stacked: bool = False) -> dict[str, tuple]:
    """``{leaf_path: shape its quantizer sees}``: kernels with their output features merged
    into the last axis (:func:`hqjax.tree.kernel_view_shape`), every other leaf as it is;
    with ``stacked``, the shapes of one layer of each leaf (its leading axis dropped)."""
    shapes = {path_name(p): tuple(jnp.shape(x))[int(stacked):] for p, x in
              jax.tree_util.tree_flatten_with_path(params)[0]}
    return {lp: kernel_view_shape(s, shapes.get(lp[:-len("kernel")] + "bias")) if lp.endswith("kernel") else s
            for lp, s in shapes.items()}


def weight_specs(params: PyTree, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights) -> dict:
    """``{layer_path: QuantSpec}`` of the weight quantizer of every configured layer (for the
    kernel's view: output features merged into the last axis)."""
    views = (_view_shapes(params), _view_shapes(params, stacked=True))
    return {layer: weight_spec(layer, leaf, views[j is not None][lp], bits)
            for lp, entries in _weight_specs(params, bit_config, weight_spec).items()
            for layer, leaf, bits, j in entries}


def quantize_params(params: PyTree, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights, *,
                    bit_widths: Mapping | None = None) -> PyTree:
    """Fake-quantize the kernel (or embedding) of every layer in ``bit_config``.

    Parameters
    ----------
    params : Flax params (or a full variables dict; only kernel/embedding leaves change).
    bit_config : ``{layer_path: {"weight_bits": b, "act_bits": a}}`` (``hqjax.blocks`` names).
    weight_spec : ``(layer, leaf_name, shape, bits) -> QuantSpec`` (default per-channel
        symmetric, HAWQ-V3; :func:`group_wise_weights` for Q-BERT). ``shape`` is the
        kernel's with its output features merged into the last axis
        (:func:`hqjax.tree.kernel_view_shape`: attention's ``(in, heads, head_dim)``
        projections are quantized as ``(in, heads * head_dim)``).
    bit_widths : optional :func:`hqjax.bit_width_arrays` of a config over the same layers:
        its (possibly traced) weight widths replace ``bit_config``'s.

    Returns
    -------
    A pytree like ``params`` whose configured kernels are ``S·round(W/S)`` in the forward
    pass with an identity (straight-through) gradient, so ``jax.grad`` through it trains the
    float shadow weights (QAT). Entries that match no layer raise; layers the config does
    not name stay float (see :func:`coverage`).
    """
    targets = _weight_specs(params, bit_config, weight_spec)
    views = (_view_shapes(params), _view_shapes(params, stacked=True))
    if bit_widths is not None:
        check_bit_widths(validate_bit_config(bit_config), bit_widths)

    def quantized(w, name, layer, leaf_name, bits, j):
        traced = None if bit_widths is None else bit_widths[layer]["weight_bits"]
        view = views[j is not None][name]
        q = fake_quant(jnp.reshape(w, view), weight_spec(layer, leaf_name, view, bits), bits=traced)
        return jnp.reshape(q, jnp.shape(w))

    def leaf(p, x):
        name = path_name(p)
        for layer, leaf_name, bits, j in targets.get(name, ()):
            if j is None:
                return quantized(x, name, layer, leaf_name, bits, j)
            x = x.at[j].set(quantized(x[j], name, layer, leaf_name, bits, j))
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


# --------------------------------------------------------------------------- model
def act_spec_for(bit_config: Mapping, layer: str, act_mode: str) -> QuantSpec | None:
    """The input quantizer of ``layer`` (``None`` when its ``act_bits`` is absent or None);
    shared by the Linen and NNX model transforms."""
    bits = bit_config.get(layer, {}).get("act_bits")
    return None if bits is None else QuantSpec(bits=bits, mode=act_mode)


def _check_stacked_acts(bit_config: Mapping) -> None:
    """Refuse activation bits on a layer of a stack (``'stack/fc[i]'``): its input range would
    have to be calibrated and read per layer inside the user's ``nn.scan``/``nnx.scan``,
    which carries only the collections the model names."""
    acts = [k for k, v in bit_config.items() if stack_layer(k)[1] is not None and v.get("act_bits") is not None]
    if acts:
        raise ValueError(f"layers {acts[:3]}{' ...' if len(acts) > 3 else ''} of a stacked module (nn.scan / "
                         f"nnx.scan) have act_bits set; hqjax quantizes only the weights of stacked layers: set "
                         f"act_bits=None for them (weight-only mixed precision)")


def _static_width_calibrator(calibrator: Calibrator, bit_widths) -> None:
    if bit_widths is not None and calibrator.name == "mse":
        raise ValueError("the 'mse' calibrator searches a clipping range for one static width; with bit_widths "
                         "calibrate with 'minmax', 'ema' or 'percentile', or quantize the model per configuration")


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """A Linen model with fake-quantized weights and calibrated activation quantizers.

    Build with :func:`quantize_model`. Variables are the float model's variables plus a
    ``'quant_stats'`` collection ``{layer_path: {'input': {'min', 'max', 'count'}}}``.

    Attributes
    ----------
    model : the plain Flax model.
    bit_config : validated BitConfig.
    weight_spec : per-layer weight quantizer factory.
    act_mode : ``'asymmetric'`` (default; becomes HAWQ-V3's unsigned after ReLU) or
        ``'symmetric'``.
    calibrator : how calibration updates the ranges.
    """

    model: nn.Module
    bit_config: dict
    weight_spec: WeightSpecFn = per_channel_weights
    act_mode: str = "asymmetric"
    calibrator: Calibrator = dataclasses.field(default_factory=lambda: get_calibrator("minmax"))

    def act_spec(self, layer: str) -> QuantSpec | None:
        return act_spec_for(self.bit_config, layer, self.act_mode)

    def _interceptor(self, calibrate: bool, bit_widths=None):
        def intercept(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, _LAYERS) or isinstance(mod, nn.Embed):
                return next_fun(*args, **kwargs)
            layer = "/".join(mod.path)
            spec = self.act_spec(layer)
            if spec is None or not args:
                return next_fun(*args, **kwargs)
            x, rest = args[0], args[1:]
            if calibrate:
                try:
                    var = mod.scope.variable(STATS, "input", self.calibrator.init)
                except flax.errors.ScopeCollectionNotFound:
                    raise ValueError(f"layer {layer!r} has act_bits={spec.bits} but runs inside a Flax lifted "
                                     f"transform (nn.scan / nn.vmap) that does not carry {STATS!r}; quantize "
                                     f"only its weights (act_bits=None), naming each layer of a stack as "
                                     f"hqjax.blocks(params, stacked=hqjax.stacked_modules(...)) does") from None
                var.value = self.calibrator.update(var.value, jax.lax.stop_gradient(x), spec)
                return next_fun(x, *rest, **kwargs)
            if not mod.scope.has_variable(STATS, "input"):
                raise ValueError(f"layer {layer!r} has act_bits={spec.bits} but no calibrated input range in "
                                 f"variables[{STATS!r}]; run QuantizedModel.calibrate on a few batches first "
                                 f"(or set act_bits=None for this layer)")
            stats = mod.scope.get_variable(STATS, "input")
            bits = None if bit_widths is None else bit_widths[layer]["act_bits"]
            return next_fun(fake_quant(x, spec, state_range(stats), bits=bits), *rest, **kwargs)

        return intercept

    def _quantized_variables(self, variables, bit_widths=None):
        variables = dict(variables)
        variables["params"] = quantize_params(variables["params"], self.bit_config, self.weight_spec,
                                              bit_widths=bit_widths)
        return variables

    def apply(self, variables: PyTree, *args, train: bool = False, mutable=False, bit_widths: Mapping | None = None,
              **kwargs):
        """Frozen mode: fake-quantized weights and activations with the calibrated ranges.

        ``mutable`` is passed to Flax (``['batch_stats']`` when ``train`` with BatchNorm).
        ``bit_widths`` (:func:`hqjax.bit_width_arrays`) replaces the BitConfig's widths with
        array inputs, so one compiled function serves every configuration.
        """
        with nn.intercept_methods(self._interceptor(calibrate=False, bit_widths=bit_widths)):
            return self.model.apply(self._quantized_variables(variables, bit_widths), *args, train=train,
                                    mutable=mutable, **kwargs)

    def calibrate(self, variables: PyTree, *args, train: bool = False, bit_widths: Mapping | None = None,
                  **kwargs) -> PyTree:
        """Calibration mode: run the model with fake-quantized weights and float activations,
        update every quantized layer's input range, and return ``variables`` with the new
        ``'quant_stats'`` (call it on a few batches; it is pure and jit-able). ``bit_widths``
        as in :meth:`apply` (a calibrator that depends on the width, ``'mse'``, raises)."""
        _static_width_calibrator(self.calibrator, bit_widths)
        with nn.intercept_methods(self._interceptor(calibrate=True)):
            _, new = self.model.apply(self._quantized_variables(variables, bit_widths), *args, train=train,
                                      mutable=[STATS], **kwargs)
        return {**variables, STATS: new[STATS]}

    def float_apply(self, variables: PyTree, *args, train: bool = False, mutable=False, **kwargs):
        """The full-precision model (teacher for distillation, reference for accuracy)."""
        variables = {k: v for k, v in variables.items() if k != STATS}
        return self.model.apply(variables, *args, train=train, mutable=mutable, **kwargs)


def quantize_model(model: nn.Module, bit_config: Mapping, *, weight_spec: WeightSpecFn = per_channel_weights,
                   act_mode: str = "asymmetric", calibrator: str | Calibrator = "minmax",
                   params: PyTree | None = None) -> QuantizedModel:
    """Wrap a Flax Linen model for fake-quantized inference, calibration and QAT.

    Parameters
    ----------
    model : a Linen module called as ``model.apply(variables, x, train=...)``.
    bit_config : ``{layer_path: {"weight_bits": b, "act_bits": a}}``.
    weight_spec : weight quantizer per layer (:func:`per_channel_weights`,
        :func:`group_wise_weights`).
    act_mode : activation quantizer mode: ``'asymmetric'`` (default; exactly HAWQ-V3's
        unsigned quantizer wherever the calibrated minimum is 0), ``'symmetric'`` or
        ``'unsigned'`` (clips negatives).
    calibrator : ``'minmax'``, ``'ema'``, ``'percentile'``, ``'mse'`` or a ``Calibrator``.
    params : optional params to check the config against now (unknown layer paths raise
        here rather than at the first call).

    An NNX model (an ``nnx.Module`` or ``hqjax.from_nnx``'s model) gives a
    :class:`hqjax.QuantizedNNXApply` with the same interface and the same numbers.
    """
    from hqjax._nnx import NNXApply, is_nnx_module

    if is_nnx_module(model) or isinstance(model, NNXApply):
        from hqjax.quant.nnx_transform import quantize_nnx_apply

        return quantize_nnx_apply(model, bit_config, weight_spec=weight_spec, act_mode=act_mode,
                                  calibrator=calibrator)
    cfg = validate_bit_config(bit_config)
    _check_stacked_acts(cfg)
    if act_mode not in ("asymmetric", "symmetric", "unsigned"):
        raise ValueError(f"act_mode={act_mode!r}: use 'asymmetric' (unsigned wherever the calibrated minimum "
                         f"is 0, e.g. after ReLU), 'symmetric' or 'unsigned'")
    if params is not None:
        _weight_specs(params.get("params", params), cfg, weight_spec)
    return QuantizedModel(with_train_arg(model), cfg, weight_spec, act_mode, get_calibrator(calibrator))
