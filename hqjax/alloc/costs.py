"""Per-layer costs at each bit width: parameters, model size, MACs, BOPS and latency.

Shapes come from the model itself: the Flax model is traced with ``jax.eval_shape`` under
``nn.intercept_methods`` and every Dense / DenseGeneral (attention projections) / Conv /
Embed call records its input, kernel and output shapes under its module path, the same
names ``hqjax.blocks(params)`` gives. An NNX model (an ``nnx.Module``, or the pair from
``hqjax.from_nnx``) is traced the same way with its Linear / LinearGeneral / Conv / Embed
layers hooked (NNX has no method interception), so a Linen network and its NNX twin get the
same table. MACs are per example. A layer applied from a stack (a Linen ``nn.scan`` /
``nn.vmap``, NNX ``nnx.vmap``-made layers under ``nnx.scan``) sees one slice of params with a
leading layer axis; it is listed once per layer of the stack, ``'stack/fc[i]'``, the names
``hqjax.blocks(params, stacked=stacked_modules(...))`` gives.

Cost definitions (HAWQ-V3 Sec. 3.4):
- size (bytes) = ``n_weights * w / 8 + n_bias * bias_bits / 8``,
- BOPS = ``MACs * w * a`` (van Baalen et al. 2020's bit operations),
- latency (µs) = a measured table ``{layer: {bits: µs}}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "COST_KINDS",
    "LayerShape",
    "LayerCosts",
    "layer_shapes",
    "stacked_modules",
    "load_latency_table",
    "save_latency_table",
    "bit_serial_op",
    "measure_latency_table",
]

PyTree = Any
COST_KINDS = ("size", "bops", "latency")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What one weight layer does, from a trace of the model.

    Attributes
    ----------
    name : module path (``'stage2/block0/conv1'``).
    kind : ``'dense'``, ``'dense_general'``, ``'conv'`` or ``'embed'``.
    input_shape, kernel_shape, output_shape : shapes seen in the trace (batch first).
    macs : multiply-accumulates per example.
    n_weights, n_bias : kernel and bias element counts.
    strides, padding, feature_group_count : convolution settings (for latency measurement).
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    n_weights: int
    n_bias: int
    strides: tuple[int, ...] = ()
    padding: Any = None
    feature_group_count: int = 1


def _macs(kind: str, out_shape, kernel_shape, out_features: int) -> int:
    if kind == "embed":
        return 0  # a table lookup, no multiplies
    # Each output element of a Dense/Conv is a dot product over kernel.size / out_features
    # inputs (for a grouped conv the kernel already holds in_features / groups).
    per_output = math.prod(kernel_shape) // out_features
    return int(math.prod(out_shape[1:]) * per_output)


def _layer_shape(name, kind, x_shape, kernel, bias, out_shape, out_features, strides=None, padding=None,
                 groups=1) -> LayerShape:
    """The :class:`LayerShape` of one traced call (shared by the Linen and NNX tracers)."""
    if kind == "embed":
        return LayerShape(name, kind, tuple(x_shape), tuple(kernel.shape), tuple(out_shape), 0, int(kernel.size), 0)
    extra = {}
    if kind == "conv":
        nsp = len(kernel.shape) - 2
        strides = strides if strides is not None else 1
        extra = dict(strides=tuple(strides) if isinstance(strides, Sequence) else (int(strides),) * nsp,
                     padding=padding, feature_group_count=int(groups))
    return LayerShape(name, kind, tuple(x_shape), tuple(kernel.shape), tuple(out_shape),
                      _macs(kind, out_shape, kernel.shape, out_features), int(kernel.size),
                      0 if bias is None else int(bias.size), **extra)


def _einsum_out_features(equation: str, kernel_shape) -> int:
    """Output features of an ``Einsum`` layer: the kernel axes its output keeps
    (``'btd,dnh->btnh'``: ``n * h``)."""
    inputs, out = equation.replace(" ", "").split("->")
    kernel_axes = inputs.split(",")[1]
    return math.prod(int(d) for a, d in zip(kernel_axes, kernel_shape) if a in out)


def _record(module, args, out) -> LayerShape | None:
    kinds = ((nn.Conv, "conv"), (nn.DenseGeneral, "dense_general"), (nn.Dense, "dense"), (nn.Embed, "embed"),
             (nn.Einsum, "dense_general"))
    kind = next((k for cls, k in kinds if isinstance(module, cls)), None)
    if kind is None or not module.has_variable("params", "kernel" if kind != "embed" else "embedding"):
        return None
    name = "/".join(module.path)
    if kind == "embed":
        return _layer_shape(name, kind, args[0].shape, module.get_variable("params", "embedding"), None,
                            out.shape, 0)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
    if isinstance(module, nn.Einsum):
        out_features = _einsum_out_features(module.einsum_str, kernel.shape)
    elif kind == "dense_general":
        feats = module.features if isinstance(module.features, Sequence) else (module.features,)
        out_features = math.prod(feats)
    else:
        out_features = int(kernel.shape[-1])
    if kind != "conv":
        return _layer_shape(name, kind, args[0].shape, kernel, bias, out.shape, out_features)
    return _layer_shape(name, kind, args[0].shape, kernel, bias, out.shape, out_features, module.strides,
                        module.padding, module.feature_group_count)


def _record_nnx(name: str, layer, x, out) -> LayerShape | None:
    """The NNX counterpart of :func:`_record`."""
    from flax import nnx

    kinds = ((nnx.Conv, "conv"), (nnx.LinearGeneral, "dense_general"), (nnx.Linear, "dense"), (nnx.Embed, "embed"),
             (nnx.Einsum, "dense_general"))
    kind = next((k for cls, k in kinds if isinstance(layer, cls)), None)
    if kind is None:
        return None
    if kind == "embed":
        return _layer_shape(name, kind, x.shape, layer.embedding.value, None, out.shape, 0)
    kernel = layer.kernel.value
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else getattr(bias, "value", bias)
    if isinstance(layer, nnx.Einsum):
        out_features = _einsum_out_features(layer.einsum_str, kernel.shape)
    elif kind == "dense_general":
        feats = layer.out_features if isinstance(layer.out_features, Sequence) else (layer.out_features,)
        out_features = math.prod(feats)
    else:
        out_features = int(kernel.shape[-1])
    if kind != "conv":
        return _layer_shape(name, kind, x.shape, kernel, bias, out.shape, out_features)
    return _layer_shape(name, kind, x.shape, kernel, bias, out.shape, out_features, layer.strides, layer.padding,
                        layer.feature_group_count)


def _nnx_layer_shapes(model, variables, args, kwargs) -> dict[str, LayerShape]:
    from hqjax._nnx import with_layer_hooks

    found: dict[str, LayerShape] = {}
    train = kwargs.pop("train", False)

    def hook_for(name, layer):
        def hook(layer, x, *a, **kw):
            out = layer(x, *a, **kw)
            rec = _record_nnx(name, layer, x, out)
            if rec is not None and name not in found:
                found[name] = rec
            return out

        return hook

    def run(v, *xs):
        module = model.merge(v)
        model.set_mode(module, train)
        with with_layer_hooks(module, hook_for):
            return module(*xs, **kwargs)

    jax.eval_shape(run, variables, *args)
    return found


def _traced_shapes(model, variables, args, kwargs) -> tuple[dict[str, LayerShape], PyTree]:
    """Each weight layer's first call, as traced, and the params it read them from."""
    from hqjax._linen import with_train_arg
    from hqjax._nnx import NNXApply, from_nnx, is_nnx_module

    if is_nnx_module(model):
        args = (variables, *args)
        model, variables = from_nnx(model)
    if isinstance(model, NNXApply):
        found = _nnx_layer_shapes(model, variables, args, dict(kwargs))
        if not found:
            raise ValueError(f"{model.name} called no nnx.Linear, LinearGeneral, Conv or Embed layer; nothing to "
                             f"cost (hqjax costs the layers that own a 'kernel' or 'embedding')")
        return found, variables["params"]
    if not hasattr(model, "apply"):
        raise TypeError(f"layer_shapes needs a Flax Linen or NNX module, got {type(model).__name__}")
    model = with_train_arg(model)
    variables = nn.meta.unbox(variables)  # nn.with_partitioning: layers read the arrays
    found: dict[str, LayerShape] = {}

    def interceptor(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        if context.method_name == "__call__":
            rec = _record(context.module, a, out)
            if rec is not None and rec.name not in found:
                found[rec.name] = rec
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, *xs: model.apply(v, *xs, **kwargs), variables, *args)
    if not found:
        raise ValueError(f"{type(model).__name__} called no Dense, DenseGeneral, Conv or Embed layer; nothing to cost")
    return found, variables.get("params", variables)


def _stacks(found: Mapping[str, LayerShape], params: PyTree) -> dict[str, tuple[str, int]]:
    """``{layer: (stack, depth)}`` for each traced layer whose stored owning weight has one
    more leading axis than the weight it saw: the layer runs ``depth`` times from a stack,
    and ``stack`` is its highest enclosing module all of whose params and layers share that
    axis (the scanned module, so its layers group together)."""
    from hqjax.tree import path_name

    leaves = {path_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    depth = {}
    for n, rec in found.items():
        stored = leaves.get(f"{n}/{'embedding' if rec.kind == 'embed' else 'kernel'}")
        extra = None if stored is None else len(stored) - len(rec.kernel_shape)
        if extra == 1 and stored[1:] == rec.kernel_shape:
            depth[n] = stored[0]
        elif extra and extra > 1 and stored[extra:] == rec.kernel_shape:
            raise ValueError(f"layer {n!r} runs in nested stacks: its stored kernel {stored} carries {extra} layer "
                             f"axes in front of the {rec.kernel_shape} it uses; hqjax splits one layer axis (one "
                             f"nn.scan / nnx.scan over layers)")

    def shares_axis(prefix: str, d: int) -> bool:
        under = [s for p, s in leaves.items() if p.startswith(prefix + "/")]
        layers = [n for n in found if n.startswith(prefix + "/")]
        return all(s[:1] == (d,) for s in under) and all(depth.get(n) == d for n in layers)

    out = {}
    for n, d in depth.items():
        stack = n
        while "/" in stack and shares_axis(stack.rsplit("/", 1)[0], d):
            stack = stack.rsplit("/", 1)[0]
        out[n] = (stack, d)
    return out


def layer_shapes(model: nn.Module, variables, *args, **kwargs) -> dict[str, LayerShape]:
    """Trace ``model.apply(variables, *args, **kwargs)`` (shapes only) and describe each weight layer.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is computed. Pass ``train=``
    explicitly as the model expects. A layer called several times keeps its first call; a
    layer of a stack (:func:`stacked_modules`) is listed once per layer, ``'<path>[i]'``,
    grouped layer by layer.

    ``model`` may be a Linen module, an ``nnx.Module`` (then ``variables`` is left out:
    ``layer_shapes(nnx_model, x)``; its own state is used) or the pair of ``hqjax.from_nnx``.
    """
    found, params = _traced_shapes(model, variables, args, kwargs)
    stacks = _stacks(found, params)
    out: dict[str, LayerShape] = {}
    for n, rec in found.items():
        if n not in stacks:
            out[n] = rec
            continue
        stack, d = stacks[n]
        if any(k.startswith(f"{n}[") for k in out):
            continue
        members = [k for k in found if stacks.get(k, (None,))[0] == stack]
        out.update({f"{k}[{i}]": dataclasses.replace(found[k], name=f"{k}[{i}]") for i in range(d) for k in members})
    return out


def stacked_modules(model: nn.Module, variables, *args, **kwargs) -> tuple[str, ...]:
    """Module paths whose params carry a leading layer axis, found from a trace of the model.

    A Linen ``nn.scan`` (or ``nn.vmap``) with ``variable_axes={'params': 0}`` and NNX layers
    made by ``nnx.vmap`` and applied under ``nnx.scan`` store every layer's weights in one
    array; each layer sees its slice. Pass the result to ``hqjax.blocks(params,
    stacked=...)`` so that each layer of the stack is a block (and a bit width) of its own.
    Arguments as in :func:`layer_shapes`; an empty tuple when nothing is stacked.
    """
    found, params = _traced_shapes(model, variables, args, kwargs)
    return tuple(dict.fromkeys(stack for stack, _ in _stacks(found, params).values()))


def _bits_key(key) -> str:
    s = str(key).strip().lower()
    return str(int(s)) if s.isdigit() else s


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """Per-layer quantities from which every budget's cost at given bits follows.

    Attributes
    ----------
    n_weights : ``{layer: kernel elements}`` (quantized at the weight bits).
    macs : ``{layer: MACs per example}``.
    n_bias : ``{layer: bias elements}`` (kept at ``bias_bits``).
    latency_us : ``{layer: {bits: µs}}``; a key ``'w4a8'`` gives a (weight, activation)
        pair, a plain ``'4'`` any activation bits.
    bias_bits : storage bits of biases (32, as in HAWQ-V3's integer-only inference).
    """

    n_weights: Mapping[str, int]
    macs: Mapping[str, int]
    n_bias: Mapping[str, int] = dataclasses.field(default_factory=dict)
    latency_us: Mapping[str, Mapping[str, float]] | None = None
    bias_bits: int = 32

    def __post_init__(self):
        missing = set(self.n_weights) ^ set(self.macs)
        if missing:
            raise ValueError(f"n_weights and macs must name the same layers; they differ on {sorted(missing)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.n_weights)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, LayerShape], latency_us=None, bias_bits: int = 32) -> "LayerCosts":
        return cls(
            n_weights={n: s.n_weights for n, s in shapes.items()},
            macs={n: s.macs for n, s in shapes.items()},
            n_bias={n: s.n_bias for n, s in shapes.items()},
            latency_us=latency_us,
            bias_bits=bias_bits,
        )

    @classmethod
    def from_model(cls, model: nn.Module, variables, *args, latency_us=None, **kwargs) -> "LayerCosts":
        """Costs of every weight layer of ``model`` (see :func:`layer_shapes`): a Linen module
        with its variables (``from_model(model, variables, x, train=False)``) or an NNX module
        (``from_model(nnx_model, x)``)."""
        return cls.from_shapes(layer_shapes(model, variables, *args, **kwargs), latency_us=latency_us)

    def with_latency(self, table: Mapping[str, Mapping[Any, float]] | str) -> "LayerCosts":
        """A copy with a latency table (a mapping or a JSON path)."""
        table = load_latency_table(table) if isinstance(table, str) else table
        norm = {n: {_bits_key(b): float(v) for b, v in row.items()} for n, row in table.items()}
        return dataclasses.replace(self, latency_us=norm)

    def _check(self, name: str):
        if name not in self.n_weights:
            raise KeyError(f"no costs for layer {name!r}; layers are {list(self.n_weights)}")

    def size_bytes(self, name: str, w_bits: int) -> float:
        self._check(name)
        return self.n_weights[name] * w_bits / 8 + self.n_bias.get(name, 0) * self.bias_bits / 8

    def bops(self, name: str, w_bits: int, a_bits: int) -> float:
        self._check(name)
        return float(self.macs[name]) * w_bits * a_bits

    def _latency_row(self, name: str) -> dict[str, float]:
        self._check(name)
        if self.latency_us is None:
            raise ValueError("a latency budget needs a latency table: costs.with_latency(table or path)")
        if name not in self.latency_us:
            raise KeyError(f"layer {name!r} is missing from the latency table; it has {list(self.latency_us)[:8]}")
        return {_bits_key(b): v for b, v in self.latency_us[name].items()}

    @staticmethod
    def _lookup(row, name, w_bits, a_bits) -> float:
        for key in (f"w{w_bits}a{a_bits}", str(w_bits)):
            if key in row:
                return float(row[key])
        raise KeyError(f"latency table has no entry for layer {name!r} at w{w_bits}a{a_bits}; it has {sorted(row)}")

    def latency(self, name: str, w_bits: int, a_bits: int) -> float:
        return self._lookup(self._latency_row(name), name, w_bits, a_bits)

    def cost(self, kind: str, name: str, w_bits: int, a_bits: int) -> float:
        """Cost of layer ``name`` at ``(w_bits, a_bits)`` under budget ``kind``."""
        if kind == "size":
            return self.size_bytes(name, w_bits)
        if kind == "bops":
            return self.bops(name, w_bits, a_bits)
        if kind == "latency":
            return self.latency(name, w_bits, a_bits)
        raise ValueError(f"unknown budget kind {kind!r}; budgets are {list(COST_KINDS)}")

    def matrix(self, kind: str, names: Sequence[str], choices: Sequence[tuple[int, int]]) -> np.ndarray:
        """``[len(names), len(choices)]`` costs under ``kind`` at each ``(w_bits, a_bits)`` choice."""
        for n in names:
            self._check(n)
        w = np.array([c[0] for c in choices], np.float64)
        a = np.array([c[1] for c in choices], np.float64)
        if kind == "size":
            nw = np.array([self.n_weights[n] for n in names], np.float64)[:, None]
            nb = np.array([self.n_bias.get(n, 0) for n in names], np.float64)[:, None]
            return nw * w / 8 + nb * self.bias_bits / 8
        if kind == "bops":
            return np.array([self.macs[n] for n in names], np.float64)[:, None] * (w * a)
        if kind != "latency":
            raise ValueError(f"unknown budget kind {kind!r}; budgets are {list(COST_KINDS)}")
        out = np.empty((len(names), len(choices)), np.float64)
        for i, n in enumerate(names):
            row = self._latency_row(n)
            for j, (cw, ca) in enumerate(choices):
                out[i, j] = self._lookup(row, n, cw, ca)
        return out

    def table(self, bits: Sequence[int]) -> dict[str, dict[int, dict[str, float]]]:
        """``{layer: {b: {size, bops[, latency]}}}`` at W=A=b, for reports."""
        kinds = COST_KINDS if self.latency_us is not None else COST_KINDS[:2]
        return {n: {b: {k: self.cost(k, n, b, b) for k in kinds} for b in bits} for n in self.names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerCosts":
        return cls(**d)


def load_latency_table(path: str) -> dict[str, dict[str, float]]:
    """Read ``{layer: {bits: µs}}`` from JSON."""
    with open(path) as f:
        raw = json.load(f)
    return {n: {_bits_key(b): float(v) for b, v in row.items()} for n, row in raw.items()}


def save_latency_table(table: Mapping[str, Mapping[Any, float]], path: str) -> None:
    with open(path, "w") as f:
        json.dump({n: {_bits_key(b): float(v) for b, v in row.items()} for n, row in table.items()}, f, indent=1)


def _storage_dtype(bits: int):
    # The narrowest integer type XLA runs natively; int4 is rejected by XLA:CPU dot_general.
    return jnp.int8 if bits <= 8 else jnp.int16 if bits <= 16 else jnp.float32


def _reference_op(shape: LayerShape, bits: int) -> tuple[Callable, tuple]:
    """The layer's integer product at ``bits`` (int32 accumulation), XLA reference."""
    dt = _storage_dtype(bits)
    acc = jnp.float32 if dt == jnp.float32 else jnp.int32
    x = jnp.ones(shape.input_shape, dt)
    k = jnp.ones(shape.kernel_shape, dt)
    if shape.kind == "conv":
        nsp = len(shape.kernel_shape) - 2
        pad = shape.padding
        if isinstance(pad, int):
            pad = ((pad, pad),) * nsp
        elif not isinstance(pad, str):
            pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
        elif pad.upper() not in ("SAME", "VALID"):
            pad = "SAME"
        spec = lax.conv_dimension_numbers(x.shape, k.shape, ("N" + "HWD"[:nsp] + "C", "HWD"[:nsp] + "IO", "N" + "HWD"[:nsp] + "C"))

        def fn(x, k):
            return lax.conv_general_dilated(x, k, shape.strides, pad, dimension_numbers=spec,
                                            feature_group_count=shape.feature_group_count, preferred_element_type=acc)

        return fn, (x, k)
    if shape.kind == "embed":
        idx = jnp.zeros(shape.input_shape, jnp.int32)
        return (lambda i, k: jnp.take(k, i, axis=0)), (idx, k)
    n_in = shape.macs // max(math.prod(shape.output_shape[1:]), 1)  # macs = outputs x inputs per output
    x2 = jnp.ones((math.prod(shape.input_shape) // n_in, n_in), dt)
    k2 = jnp.ones((n_in, math.prod(shape.kernel_shape) // n_in), dt)
    return (lambda x, k: lax.dot_general(x, k, (((1,), (0,)), ((), ())), preferred_element_type=acc)), (x2, k2)


def bit_serial_op(shape: LayerShape, bits: int) -> tuple[Callable, tuple]:
    """The layer's integer product computed bit-serially over the weights: ``bits`` products
    of the int8 activations with one weight bit plane each, shifted and summed (the two's
    complement sign plane subtracted), as bit-serial kernels for CPUs without sub-byte
    arithmetic do (Umuroglu et al. 2018, BISMO; TVM's ``bitserial_conv2d``). Its time grows
    with the width, where the default int8 reference runs 2-8 bits alike. An ``op`` for
    :func:`measure_latency_table`; the result equals the int8 product exactly.
    """
    if bits > 8 or shape.kind == "embed":
        return _reference_op(shape, bits)
    product, (x, k) = _reference_op(shape, 8)

    def fn(x, k):
        k32 = k.astype(jnp.int32)
        acc = -(product(x, ((k32 >> (bits - 1)) & 1).astype(jnp.int8)) << (bits - 1))
        for j in range(bits - 1):
            acc = acc + (product(x, ((k32 >> j) & 1).astype(jnp.int8)) << j)
        return acc

    return fn, (x, k)


def measure_latency_table(
    shapes: Mapping[str, LayerShape],
    bits: Sequence[int],
    *,
    op: Callable[[LayerShape, int], tuple[Callable, tuple]] | None = None,
    repeats: int = 20,
) -> dict[str, dict[str, float]]:
    """Measure ``{layer: {bits: median µs}}`` on the current default device.

    Parameters
    ----------
    shapes : from :func:`layer_shapes` (the batch size of the trace is the one timed).
    bits : bit widths to time.
    op : ``(shape, bits) -> (fn, args)`` building the layer's kernel at ``bits``; default the
        XLA integer reference (int8 operands for bits <= 8, int32 accumulation). Pass a
        sub-byte kernel here where the device has one: with the default, 2-8 bits run the
        same int8 code and so measure alike, which is the truth of such a device.
    repeats : timed calls per entry after one warm-up call (compile time excluded).

    The layers of a stack (``'stack/fc[i]'``) run one op: it is timed once, for the first.
    """
    from hqjax.tree import stack_layer

    build = op or _reference_op
    table: dict[str, dict[str, float]] = {}
    timed: dict[str, dict[str, float]] = {}  # a stack's module -> its first layer's row
    for name, shape in shapes.items():
        module, layer = stack_layer(name)
        if layer is not None and module in timed:  # the same op as the stack's first layer
            table[name] = dict(timed[module])
            continue
        row = {}
        for b in bits:
            fn, args = build(shape, int(b))
            fn = jax.jit(fn)
            jax.block_until_ready(fn(*args))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times.append(time.perf_counter() - t0)
            row[str(int(b))] = float(np.median(times) * 1e6)
        table[name] = row
        if layer is not None:
            timed[module] = row
    return table
