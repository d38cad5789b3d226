"""Integer-only inference (HAWQ-V3, Yao et al. 2021, Sec. 3): a calibrated fake-quant model
becomes int8/int4 weights, int32 biases and dyadic requantizers, run with integers only.

:func:`to_integer` lowers the model's own traced program (Linen or NNX; see
:mod:`hqjax.quant._trace` and :mod:`hqjax.quant._lowering`), so any network of Dense/Conv,
BatchNorm, ReLU/ReLU6, residual adds, pooling and layout ops converts, not a list of classes.
Per layer with input ``x ≈ S_x (q_x - z_x)`` and per-channel symmetric weights ``W ≈ S_w q_w``
(the fake-quant model's integers):

- ``acc = q_x · q_w + b_int`` with ``b_int = round(b / (S_w S_x)) - z_x Σ q_w`` (the zero
  point folded into the int32 bias, so padding uses ``z_x``, the integer of a real 0); an
  inference-mode BatchNorm after it scales ``S_w S_x`` by ``γ/σ`` and joins the bias
  (HAWQ-V3 Eq. 3–4);
- the next layer's input is ``clip(round(acc · m / 2^k) + z_y)`` with
  ``m / 2^k ≈ S_w S_x / S_y`` (dyadic, HAWQ-V3 Eq. 6), ReLU/ReLU6 joining the clip;
- residual branches are rescaled to a common int32 scale before the integer addition
  (HAWQ-V3 Fig. 2); average pooling is an integer sum whose ``1/(HW)`` is folded into the
  next dyadic multiplier; max-pooling is an integer max.

Every integer product goes through :func:`int_matmul` (convolutions as patches + matmul).
The float boundary is only at the ends: :meth:`IntegerModel.quantize_input` and
:meth:`IntegerModel.dequantize_output`; :meth:`IntegerModel.forward` is integers only, unless
``to_integer(..., float_islands=True)`` kept ops with no integer form in float (listed in
``meta['float_islands']``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hqjax.kernels import int_matmul as kernel_matmul
from hqjax.quant._int_program import run_program
from hqjax.quant._lowering import Lowerer, ModelInfo, input_layer
from hqjax.quant._trace import trace_linen, trace_nnx
from hqjax.quant.quantizers import int_range, qparams_from_range
from hqjax.quant.transform import STATS, QuantizedModel, _owner_leaves, quantize_params, weight_specs
from hqjax.tree import stack_layer

__all__ = ["int_matmul", "fold_batchnorm", "IntegerModel", "to_integer", "save_integer_model",
           "load_integer_model"]


def int_matmul(a: jax.Array, b: jax.Array, *, backend: str = "xla") -> jax.Array:
    """``a[..., K] @ b[K, N]`` of int8 operands accumulated in int32 (leading batch dims of ``a``).

    :func:`hqjax.kernels.int_matmul` restricted to int8 x int8 with no epilogue: ``'xla'`` is
    ``lax.dot_general(..., preferred_element_type=int32)``, ``'triton'``/``'mosaic'`` the
    Pallas kernels (interpreted off their platform), all returning the same integers.
    """
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise TypeError(f"int_matmul takes int8 operands, got {a.dtype} x {b.dtype}")
    return kernel_matmul(a, b, backend=backend)


def fold_batchnorm(kernel, bias, bn_params, bn_stats, epsilon: float = 1e-5):
    """Fold inference-mode BatchNorm into the preceding conv (HAWQ-V3 Eq. 3):
    ``W' = W γ/σ``, ``b' = (b - μ) γ/σ + β`` per output channel, ``σ = sqrt(var + ε)``."""
    # operators only, so it runs on NumPy arrays (host-side export) and jax arrays (under jit)
    g = bn_params["scale"] / (bn_stats["var"] + epsilon) ** 0.5
    b = 0.0 * bn_params["bias"] if bias is None else bias
    return kernel * g, (b - bn_stats["mean"]) * g + bn_params["bias"]


@struct.dataclass
class IntegerModel:
    """An integer-only network: a program of small integer steps over int8/int32 registers.

    Attributes
    ----------
    arrays : ``{step_name: {name: array}}``: per Dense/Conv (named by its module path) ``w``
        int8 (K, N) — or ``w4`` for weights of at most 4 bits, :func:`hqjax.kernels.pack_int4`
        along K — and ``bias`` int32; per requantizer the dyadic ``m``/``shift`` and clip bounds.
    meta_json : static description as a JSON string (hashable, so the model passes through
        ``jit`` as an argument); ``.meta`` parses it: ``program`` (the steps), ``layers`` (the
        Dense/Conv paths in order), input/output scales, bit config, ``float_islands``.
    backend : ``int_matmul`` backend.
    islands : the float functions of float-island steps (only with ``float_islands=True``).
    """

    arrays: dict
    meta_json: str = struct.field(pytree_node=False)
    backend: str = struct.field(pytree_node=False, default="xla")
    islands: tuple = struct.field(pytree_node=False, default=())

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    def quantize_input(self, x: jax.Array) -> jax.Array:
        """Float boundary in: the model input as int8 at the first layer's input scale (token
        ids, and an input that meets a float island first, pass as they are)."""
        if self.meta["input_scale"] is None:
            return jnp.asarray(x, self.meta.get("input_dtype", "int32"))
        s, z, (lo, hi) = self.meta["input_scale"], self.meta["input_zero"], self.meta["input_range"]
        return jnp.clip(jnp.round(x / s) + z, lo, hi).astype(jnp.int8)

    def dequantize_output(self, acc: jax.Array) -> jax.Array:
        """Float boundary out: ``scale · acc`` per output element (a float island's output as is)."""
        scale = self.meta["output_scale"]
        if scale is None:
            return acc
        return acc.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)

    def forward(self, q: jax.Array) -> jax.Array:
        """Integers only (unless the model has float islands): int8 input -> int32 output.

        Compiled per program, not per model: models with the same program share one
        compilation, with their integers (zero points, shifts and ranges included) as
        arguments; ``to_integer(..., share_program=True)`` gives every configuration of a
        network the same program."""
        m = self.meta
        return _forward(json.dumps(m["program"]), m["output_reg"], self.backend, self.islands, self.arrays, q)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dequantize_output(self.forward(self.quantize_input(x)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _forward(program_json: str, output_reg: int, backend: str, islands: tuple, arrays: dict, q: jax.Array):
    return run_program(json.loads(program_json), arrays, q, output_reg, backend, islands)


# --------------------------------------------------------------------------- building (host side)
def _flat(tree) -> dict[str, np.ndarray]:
    from hqjax.tree import path_name

    return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)}  # an NNX module's RNG keys


def _act_lookup(qmodel, stats: dict):
    ranges = {k[: -len("/input/min")]: (float(v), float(stats[k[:-3] + "max"]))
              for k, v in stats.items() if k.endswith("/input/min")}

    def act(layer: str):
        """``(S_x, z_x, (qmin, qmax))`` of a layer's calibrated input quantizer."""
        spec = qmodel.act_spec(layer)
        if layer not in ranges:
            raise ValueError(f"layer {layer!r} has no calibrated input range in the quantization stats; "
                             f"run the quantized model's calibrate first")
        if spec.bits > 8:
            raise ValueError(f"layer {layer!r}: act_bits={spec.bits} > 8 is not supported by int8 integer inference")
        s, z = qparams_from_range(*ranges[layer], spec)
        return float(s), int(z), int_range(spec)

    return act


def _embedding_config(qmodel, params) -> dict:
    """The part of the BitConfig naming embedding tables: traced fake-quantized, so that a
    float island's lookup reads the fake-quant model's table (layers are quantized from
    the float kernels by the lowering itself)."""
    owners = _owner_leaves(params)
    return {k: v for k, v in qmodel.bit_config.items() if k in owners and owners[k][1] == "embedding"}


def _trace(qmodel, variables, input_shape, input_dtype=jnp.float32):
    """``(traced, flat variables, flat stats, params pure dict)`` of a Linen or NNX fake-quant model."""
    from hqjax.quant.nnx_transform import QuantizedNNXApply, QuantizedNNXModel, quantize_nnx_state

    example = jnp.zeros((1, *input_shape), input_dtype)
    if isinstance(qmodel, QuantizedModel):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError("for a Linen QuantizedModel, variables is the calibrated variables dict "
                            f"(params, batch_stats, {STATS!r})")
        float_vars = {k: v for k, v in variables.items() if k != STATS}
        emb = _embedding_config(qmodel, variables["params"])
        if emb:
            float_vars["params"] = quantize_params(variables["params"], emb, qmodel.weight_spec)
        traced = trace_linen(qmodel.model, float_vars, example)
        flat = {**_flat(variables.get("batch_stats", {})), **_flat(variables["params"])}
        return traced, flat, _flat(variables.get(STATS, {})), variables["params"]
    if isinstance(qmodel, QuantizedNNXModel):
        from flax import nnx

        if not isinstance(variables, (tuple, list)) or len(variables) != 3:
            raise TypeError("for a QuantizedNNXModel, variables is the tuple (params, rest, stats) that its "
                            "apply takes (params, rest = nnx.split(model, nnx.Param, ...); stats from calibrate)")
        params, rest, stats = variables
        pure = nnx.to_pure_dict(params)
        emb = _embedding_config(qmodel, pure)
        traced = trace_nnx(qmodel.graphdef, quantize_nnx_state(params, emb, qmodel.weight_spec) if emb else params,
                           rest, example)
        return traced, {**_flat(nnx.to_pure_dict(rest)), **_flat(pure)}, _flat(stats or {}), pure
    if isinstance(qmodel, QuantizedNNXApply):  # an NNX model in Linen's convention (hqjax.from_nnx)
        from flax import nnx

        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError("for a QuantizedNNXApply, variables is the calibrated variables dict "
                            f"(params, batch_stats, {STATS!r})")
        emb = _embedding_config(qmodel, variables["params"])
        module = qmodel.model.merge({k: v for k, v in variables.items() if k != STATS},
                                    params=quantize_params(variables["params"], emb, qmodel.weight_spec) if emb else None)
        qmodel.model.set_mode(module, False)
        graphdef, qparams, rest = nnx.split(module, nnx.Param, ...)
        traced = trace_nnx(graphdef, qparams, rest, example)
        pure = variables["params"]
        return traced, {**_flat(nnx.to_pure_dict(rest)), **_flat(pure)}, _flat(variables.get(STATS, {})), pure
    raise TypeError(f"to_integer takes a QuantizedModel (hqjax.quantize_model) or a QuantizedNNXModel "
                    f"(hqjax.quantize_nnx_model), got {type(qmodel).__name__}")


def _group_islands(steps, op_meta) -> list[dict]:
    """Float ops grouped into islands: runs of consecutive float steps of the program, each
    ``{"paths": module paths ('' = top level), "modules": their classes, "ops": primitives}``."""
    islands, current = [], None
    for step in steps:
        if step["op"] == "float":
            m = op_meta[step["island"]]
            if current is None:
                current = {"paths": [], "modules": [], "ops": []}
                islands.append(current)
            if m["path"] not in current["paths"]:
                current["paths"].append(m["path"])
                current["modules"].append(m["module"])
            current["ops"].append(m["op"])
        elif step["op"] != "dequant":
            current = None
    return islands


def to_integer(qmodel, variables, input_shape, *, backend: str = "xla", pack_int4: bool = True,
               float_islands: bool = False, input_dtype=jnp.float32, share_program: bool = False) -> IntegerModel:
    """Lower a calibrated fake-quant model (Linen or NNX) to an integer-only :class:`IntegerModel`.

    The model's own program is traced on one example and lowered op by op
    (:mod:`hqjax.quant._lowering`): Dense/Conv (any strides, padding, dilation, groups),
    BatchNorm in inference mode (folded into the preceding layer), ReLU/ReLU6, residual adds,
    max/average/global pooling, reshape, transpose, slice, pad and concatenation. The integer
    weights and activation quantizers are the fake-quant model's, so both compute the same
    integers up to requantization rounding.

    Parameters
    ----------
    qmodel : a :class:`QuantizedModel` (:func:`hqjax.quantize_model`) or a
        :class:`~hqjax.quant.nnx_transform.QuantizedNNXModel` (:func:`hqjax.quantize_nnx_model`).
    variables : Linen: the calibrated variables (``params``, ``batch_stats``, ``quant_stats``);
        NNX: the tuple ``(params, rest, stats)`` its ``apply`` takes.
    input_shape : one example's shape, e.g. ``(8, 8, 1)``.
    backend : the ``int_matmul`` backend.
    pack_int4 : store weights of at most 4 bits packed two per byte (half the memory) and
        multiply them with :func:`hqjax.kernels.int4_matmul`; the integers are the same.
    float_islands : keep ops with no integer form (softmax, LayerNorm, GELU, ...) in float —
        dequantize, float op, requantize at the next layer — and list each in
        ``meta['float_islands']``. Off by default: such an op raises, naming it and its module path.
    input_dtype : the model input's dtype. An integer dtype means token ids: they enter the
        program as they are (no input quantizer) and the embedding lookup runs as a float island
        (with the fake-quant embedding table) up to the first Dense layer, so it needs
        ``float_islands=True``.
    share_program : give every configuration of the network (any weight and activation
        widths) the same program, so a sweep compiles :meth:`IntegerModel.forward` once: both
        branches of a residual add are rescaled, one more elementwise step per add. Off: the
        leanest program for this configuration (whether it matches another one's depends on
        which calibrated scales are equal). The integers are the same either way.
    """
    ids = jnp.issubdtype(input_dtype, jnp.integer)
    if ids and not float_islands:
        raise ValueError(f"the model takes integer inputs (token ids, one example of shape {tuple(input_shape)}): "
                         f"its embedding lookup has no integer form here. Pass float_islands=True to run it, and "
                         f"what follows up to the first Dense layer, in float")
    stacked = [k for k in qmodel.bit_config if stack_layer(k)[1] is not None]
    if stacked:
        raise ValueError(f"integer-only inference cannot lower the layers of a stacked module (nn.scan / nnx.scan): "
                         f"{stacked[:3]}{' ...' if len(stacked) > 3 else ''}; serve their quantized weights "
                         f"(hqjax.quantize_params) or export them to Qwix (hqjax.export_qwix)")
    traced, flat, stats, params = _trace(qmodel, variables, input_shape, input_dtype)
    layers = [l.path for l in traced.layers if l.kind in ("dense", "conv")]
    missing = [n for n in layers if n not in qmodel.bit_config or qmodel.act_spec(n) is None]
    if missing:
        raise ValueError(f"integer inference needs weight_bits and act_bits for every layer; missing or "
                         f"act_bits=None: {missing}. Use e.g. hqjax.uniform_bit_config(blocks, 8, 8)")
    wspecs = weight_specs(params, qmodel.bit_config, qmodel.weight_spec)
    info = ModelInfo(flat, _act_lookup(qmodel, stats), wspecs.__getitem__, pack_int4)
    lowerer = Lowerer(traced, info, float_islands, share_program)
    raw = ids
    if not ids:
        try:
            first = input_layer(traced)
        except ValueError as e:  # the input meets a float op first (a normalization, a GELU)
            if not float_islands:
                raise ValueError(f"{e}. Pass float_islands=True to take the input in float up to the first "
                                 f"layer") from None
            raw = True
    s, z, rng = (None, None, None) if raw else info.act(first)
    out_reg, out_scale = lowerer.run(None if raw else (s, z, rng))
    islands = _group_islands(lowerer.steps, lowerer.island_meta)
    for i, isl in enumerate(islands):
        logging.getLogger("hqjax").info("to_integer: float island %d at %s: %s", i, isl["paths"], isl["ops"])
    meta = {"program": lowerer.steps, "output_reg": out_reg, "layers": lowerer.layers, "input_scale": s,
            "input_zero": z, "input_range": None if raw else list(rng), "output_scale": out_scale,
            "input_dtype": str(jnp.dtype(input_dtype)), "bit_config": qmodel.bit_config,
            "act_mode": qmodel.act_mode, "input_shape": list(input_shape), "float_islands": islands}
    return IntegerModel(lowerer.arrays, json.dumps(meta), backend, tuple(lowerer.islands))


# --------------------------------------------------------------------------- serialization
_SEP = "::"


def _export_island(fn, in_avals) -> np.ndarray:
    """A float island as serialized StableHLO (``jax.export``) with a symbolic batch size."""
    from jax import export

    try:
        import flatbuffers  # noqa: F401  (jax.export's serializer needs it)
    except ImportError:
        raise ValueError("saving an IntegerModel with float islands serializes them with jax.export, which needs "
                         "the 'flatbuffers' package: pip install flatbuffers (or lower without "
                         "float_islands)") from None

    (b,) = export.symbolic_shape("b")
    args = [jax.ShapeDtypeStruct((b, *shape), jnp.dtype(dtype)) for shape, dtype in in_avals]
    return np.frombuffer(bytes(export.export(jax.jit(fn))(*args).serialize()), np.uint8)


def save_integer_model(im: IntegerModel, directory: str | os.PathLike) -> None:
    """Write ``arrays.npz`` (integer weights, int32 biases, multipliers, shifts) and
    ``model.json`` (the program, zero points, scales, bit config, float islands) under
    ``directory``; float islands, if any, go to ``islands.npz`` as serialized ``jax.export``s."""
    meta = im.meta
    avals = {s["island"]: s["in_avals"] for s in meta["program"] if s["op"] == "float"}
    exported = {f"island{k}": _export_island(fn, avals[k]) for k, fn in enumerate(im.islands)}  # before any write
    os.makedirs(directory, exist_ok=True)
    flat = {f"{layer}{_SEP}{k}": np.asarray(v) for layer, rec in im.arrays.items() for k, v in rec.items()}
    np.savez(os.path.join(directory, "arrays.npz"), **flat)
    if exported:
        np.savez(os.path.join(directory, "islands.npz"), **exported)
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump({"format": "hqjax.IntegerModel/2", "backend": im.backend, "meta": meta}, f, indent=1)


def load_integer_model(directory: str | os.PathLike, *, backend: str | None = None) -> IntegerModel:
    """Read a model written by :func:`save_integer_model` (same predictions, bit for bit)."""
    with open(os.path.join(directory, "model.json")) as f:
        doc = json.load(f)
    if doc.get("format") != "hqjax.IntegerModel/2":
        raise ValueError(f"{directory!r} does not hold an hqjax integer model of this version (format "
                         f"{doc.get('format')!r}, expected 'hqjax.IntegerModel/2'); convert the model again")
    arrays: dict[str, dict[str, Any]] = {}
    with np.load(os.path.join(directory, "arrays.npz")) as z:
        for key in z.files:
            layer, name = key.rsplit(_SEP, 1)
            arrays.setdefault(layer, {})[name] = jnp.asarray(z[key])
    islands = []
    if any(s["op"] == "float" for s in doc["meta"]["program"]):
        from jax import export

        with np.load(os.path.join(directory, "islands.npz")) as z:
            islands = [export.deserialize(bytearray(z[f"island{k}"].tobytes())).call for k in range(len(z.files))]
    return IntegerModel(arrays, json.dumps(doc["meta"]), backend or doc["backend"], tuple(islands))
