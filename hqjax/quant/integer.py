"""Integer-only inference (HAWQ-V3, Yao et al. 2021, Sec. 3): a calibrated fake-quant model
becomes int8/int4 weights, int32 biases and dyadic requantizers, run with integers only.

Per layer with input ``x ≈ S_x (q_x - z_x)`` and per-channel symmetric weights
``W ≈ S_w q_w`` (BatchNorm folded in first, HAWQ-V3 Eq. 3–4):

- ``acc = q_x · q_w + b_int`` with ``b_int = round(b / (S_w S_x)) - z_x Σ q_w`` (the zero
  point folded into the int32 bias, so padding uses ``z_x``, the integer of a real 0);
- ReLU is ``max(acc, 0)``; the next layer's input is
  ``clip(round(acc · m / 2^k) + z_y)`` with ``m / 2^k ≈ S_w S_x / S_y`` (dyadic, HAWQ-V3 Eq. 6);
- residual branches are each requantized to a common 16-bit scale before the integer
  addition (HAWQ-V3 Fig. 2); average pooling is an integer sum whose ``1/(HW)`` is folded into
  the next dyadic multiplier.

Every integer product goes through :func:`int_matmul` (convolutions as im2col + matmul).
The float boundary is only at the ends: :meth:`IntegerModel.quantize_input` and
:meth:`IntegerModel.dequantize_output`; :meth:`IntegerModel.forward` is integers only.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hqjax.kernels import im2col, int4_matmul, pack_int4
from hqjax.kernels import int_matmul as kernel_matmul
from hqjax.quant.requant import dyadic, dyadic_requantize
from hqjax.quant.quantizers import QuantSpec, int_range, qparams_from_range
from hqjax.quant.transform import STATS, QuantizedModel, weight_specs

__all__ = ["int_matmul", "fold_batchnorm", "IntegerModel", "to_integer", "save_integer_model",
           "load_integer_model", "RESIDUAL_BITS"]

RESIDUAL_BITS = 16
# the residual scale is the next layer's input scale / 2^_RES_FRACTION_BITS: 5 extra bits of
# resolution, and a 16-bit range 2^(16-1-8-5+...) = 4x the next 8-bit layer's range
_RES_FRACTION_BITS = 5


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


# --------------------------------------------------------------------------- integer ops
def _linear(arrays, meta, q, backend):
    """int32 accumulator of one dense/conv layer (bias and zero point included)."""
    if meta["op"] == "conv":
        # pad with z_x, the integer of a real 0, so padding contributes nothing
        q = im2col(q, tuple(meta["kernel_hw"]), tuple(meta["strides"]), meta["pads"],
                   pad_value=meta["in_zero"])
    if "w4" in arrays:  # int4 weights packed two per byte along K, unpacked in the kernel
        return int4_matmul(q, arrays["w4"], backend=backend) + arrays["bias"]
    return int_matmul(q, arrays["w"], backend=backend) + arrays["bias"]


def _requant(acc, arrays, meta, prefix="out"):
    lo, hi = meta[prefix + "_range"]
    y = dyadic_requantize(acc, arrays[prefix + "_m"], arrays[prefix + "_shift"]) + meta[prefix + "_zero"]
    return jnp.clip(y, lo, hi).astype(jnp.int8 if hi < 128 else jnp.int32)


def _relu(acc, meta):
    return jnp.maximum(acc, 0) if meta.get("relu") else acc


@struct.dataclass
class IntegerModel:
    """An integer-only network: int weights, int32 biases, dyadic multipliers and shifts.

    Attributes
    ----------
    arrays : ``{layer_path: {name: int array}}`` (``w`` int8 (K, N), or ``w4`` for weights of
        at most 4 bits: :func:`hqjax.kernels.pack_int4` along K, (ceil(K/2), N); ``bias``,
        ``out_m``, ``out_shift``, ...).
    meta_json : static description as a JSON string (hashable, so the model passes through
        ``jit`` as an argument); ``.meta`` parses it: ``kind`` ('chain' or 'resnet'), the
        layer order, geometry, zero points, integer ranges, input/output scales, bit config.
    backend : ``int_matmul`` backend.
    """

    arrays: dict
    meta_json: str = struct.field(pytree_node=False)
    backend: str = struct.field(pytree_node=False, default="xla")

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    def quantize_input(self, x: jax.Array) -> jax.Array:
        """Float boundary in: the model input as int8 at the first layer's input scale."""
        s, z, (lo, hi) = self.meta["input_scale"], self.meta["input_zero"], self.meta["input_range"]
        return jnp.clip(jnp.round(x / s) + z, lo, hi).astype(jnp.int8)

    def dequantize_output(self, acc: jax.Array) -> jax.Array:
        """Float boundary out: logits ``S_w S_x · acc`` per class."""
        return acc.astype(jnp.float32) * jnp.asarray(self.meta["output_scale"], jnp.float32)

    def forward(self, q: jax.Array) -> jax.Array:
        """Integers only: int8 input -> int32 logits accumulator."""
        if self.meta["kind"] == "chain":
            return _chain_forward(self, q)
        return _resnet_forward(self, q)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dequantize_output(self.forward(self.quantize_input(x)))


def _chain_forward(im, q):
    layers = im.meta["layers"]
    for i, name in enumerate(layers):
        meta = im.meta["layer_meta"][name]
        if meta.get("flatten"):
            q = q.reshape(q.shape[0], -1)
        acc = _relu(_linear(im.arrays[name], meta, q, im.backend), meta)
        if i == len(layers) - 1:
            return acc
        q = _requant(acc, im.arrays[name], meta)
    return q


def _resnet_forward(im, q):
    A, M = im.arrays, im.meta["layer_meta"]
    q = _requant(_relu(_linear(A["stem"], M["stem"], q, im.backend), M["stem"]), A["stem"], M["stem"])
    for blk in im.meta["blocks"]:
        c1, c2, bm = f"{blk}/conv1", f"{blk}/conv2", M[blk]
        y = _requant(_relu(_linear(A[c1], M[c1], q, im.backend), M[c1]), A[c1], M[c1])
        y = _requant(_linear(A[c2], M[c2], y, im.backend), A[c2], M[c2])  # int32 at the residual scale
        if bm["shortcut"] == "conv":
            sc = f"{blk}/shortcut"
            r = _requant(_linear(A[sc], M[sc], q, im.backend), A[sc], M[sc])
        else:
            r = q.astype(jnp.int32) - bm["in_zero"]
            if bm["strides"] > 1:
                r = r[:, ::bm["strides"], ::bm["strides"], :]
            pad = bm["pad_channels"]
            r = jnp.pad(r, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
            r = _requant(r, A[blk], bm, "res")
        s = jnp.maximum(y + r, 0)
        if blk == im.meta["blocks"][-1]:
            q = _requant(jnp.sum(s, axis=(1, 2)), A[blk], bm)  # integer average pooling
        else:
            q = _requant(s, A[blk], bm)
    return _linear(A["fc"], M["fc"], q, im.backend)


# --------------------------------------------------------------------------- building (host side)
def _flat(tree) -> dict[str, np.ndarray]:
    from hqjax.tree import path_name

    return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _Builder:
    """Host-side construction of integer layers from a calibrated :class:`QuantizedModel`."""

    def __init__(self, qmodel: QuantizedModel, variables, backend: str, pack: bool = True):
        self.qm, self.backend, self.pack = qmodel, backend, pack
        params = variables["params"]
        self.params = _flat(params)
        self.bstats = _flat(variables.get("batch_stats", {}))
        stats = _flat(variables.get(STATS, {}))
        self.stats = {k[: -len("/input/min")]: (float(v), float(stats[k[:-3] + "max"]))
                      for k, v in stats.items() if k.endswith("/input/min")}
        self.wspecs = weight_specs(params, qmodel.bit_config, qmodel.weight_spec)
        missing = [n for n in self._quantizable() if n not in qmodel.bit_config or qmodel.act_spec(n) is None]
        if missing:
            raise ValueError(f"integer inference needs weight_bits and act_bits for every layer; missing or "
                             f"act_bits=None: {missing}. Use e.g. hqjax.uniform_bit_config(blocks, 8, 8)")
        self.arrays, self.meta = {}, {}

    def _quantizable(self):
        return [k[: -len("/kernel")] for k in self.params if k.endswith("/kernel")]

    def act(self, layer: str):
        """``(S_x, z_x, (qmin, qmax))`` of a layer's calibrated input quantizer."""
        spec = self.qm.act_spec(layer)
        if layer not in self.stats:
            raise ValueError(f"layer {layer!r} has no calibrated input range in variables[{STATS!r}]; "
                             f"run QuantizedModel.calibrate first")
        s, z = qparams_from_range(*self.stats[layer], spec)
        if spec.bits > 8:
            raise ValueError(f"layer {layer!r}: act_bits={spec.bits} > 8 is not supported by int8 integer inference")
        return float(s), int(z), int_range(spec)

    def weight(self, layer: str, bn: str | None = None):
        w = self.params[f"{layer}/kernel"]
        b = self.params.get(f"{layer}/bias")
        if bn is not None:
            bn_p = {"scale": self.params[f"{bn}/scale"], "bias": self.params[f"{bn}/bias"]}
            bn_s = {"mean": self.bstats[f"{bn}/mean"], "var": self.bstats[f"{bn}/var"]}
            w, b = (np.asarray(t) for t in fold_batchnorm(w, b, bn_p, bn_s))
        spec: QuantSpec = self.wspecs[layer]
        if spec.mode != "symmetric" or (spec.axis is not None and spec.axis % w.ndim != w.ndim - 1):
            raise ValueError(f"layer {layer!r}: integer inference needs symmetric weights with scales per output "
                             f"channel (axis=-1), per group of output channels, or per tensor; got {spec}")
        q_w, s_w = _quantize_columns(np.asarray(w, np.float32).reshape(-1, w.shape[-1]), spec)
        return q_w, s_w.astype(np.float64), (np.zeros(w.shape[-1]) if b is None else np.asarray(b, np.float64))

    def layer(self, name, *, op="dense", bn=None, relu=False, flatten=False, in_act=None, out=None,
              kernel_hw=(1, 1), strides=(1, 1), pads=((0, 0), (0, 0))):
        """One dense/conv layer; ``out=(S_y, z_y, range)`` requantizes, ``None`` keeps int32 logits."""
        s_x, z_x, _ = in_act or self.act(name)
        q_w, s_w, b = self.weight(name, bn)
        acc_scale = s_w * s_x
        bias = np.round(b / acc_scale) - z_x * q_w.astype(np.int64).sum(0)
        if np.abs(bias).max() >= 2**31:
            raise ValueError(f"layer {name!r}: int32 bias overflows (scale {acc_scale.min():.3g}); check calibration")
        if self.pack and self.wspecs[name].bits <= 4:
            arrays = {"w4": pack_int4(jnp.asarray(q_w, jnp.int8), axis=0)}
        else:
            arrays = {"w": jnp.asarray(q_w, jnp.int8)}
        arrays["bias"] = jnp.asarray(bias, jnp.int32)
        meta = {"op": op, "relu": relu, "flatten": flatten, "in_zero": z_x, "kernel_hw": list(kernel_hw),
                "strides": list(strides), "pads": [list(p) for p in pads]}
        if out is None:
            self.meta["output_scale"] = acc_scale.tolist()
        else:
            self._requantizer(arrays, meta, "out", acc_scale / out[0], out[1], out[2])
        self.arrays[name], self.meta[name] = arrays, meta

    @staticmethod
    def _requantizer(arrays, meta, prefix, multiplier, zero, rng):
        m, k = dyadic(multiplier)
        arrays[prefix + "_m"], arrays[prefix + "_shift"] = jnp.asarray(m), jnp.asarray(k)
        meta[prefix + "_zero"], meta[prefix + "_range"] = int(zero), [int(rng[0]), int(rng[1])]


def _quantize_columns(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Host-side symmetric quantization of a ``(K, N)`` kernel, one scale per column, group of
    columns or tensor, with the float32 arithmetic of :func:`hqjax.quant.fake_quant`."""
    _, qmax = int_range(spec)
    n = w.shape[1]
    if spec.axis is None:
        groups = np.abs(w).max(keepdims=True).reshape(1)
    else:
        g = spec.group_size or 1
        groups = np.abs(w).reshape(w.shape[0], n // g, g).max(axis=(0, 2))
    scale = (groups / np.float32(qmax)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    cols = np.broadcast_to(np.repeat(scale, n // len(scale)), (n,)).astype(np.float32)
    q = np.clip(np.round(w / cols), -qmax, qmax).astype(np.int8)
    return q, cols


def _same_pads(hw, kernel_hw, strides):
    return [list(p) for p in jax.lax.padtype_to_pads(hw, kernel_hw, strides, "SAME")]


def _build_chain(b: _Builder, model, input_shape):
    from hqjax.models import CNN, MLP

    if isinstance(model, MLP):
        if model.activation != "relu":
            raise ValueError(f"integer inference supports MLP(activation='relu'), got {model.activation!r}")
        names = [f"Dense_{i}" for i in range(len(model.features) + 1)]
        geo = [dict(flatten=(i == 0)) for i in range(len(names))]
    elif isinstance(model, CNN):
        names, (h, w) = ["conv1", "conv2", "dense"], input_shape[:2]
        geo = [dict(op="conv", kernel_hw=(3, 3), strides=(1, 1), pads=_same_pads((h, w), (3, 3), (1, 1))),
               dict(op="conv", kernel_hw=(3, 3), strides=(2, 2), pads=_same_pads((h, w), (3, 3), (2, 2))),
               dict(flatten=True)]
    else:
        raise TypeError(f"no integer executor for {type(model).__name__}; supported: MLP, CNN, CifarResNet")
    for i, (name, g) in enumerate(zip(names, geo)):
        last = i == len(names) - 1
        b.layer(name, relu=not last, out=None if last else b.act(names[i + 1]), **g)
    return {"kind": "chain", "layers": names}


def _build_resnet(b: _Builder, model, input_shape):
    if (model.depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {model.depth}")
    n = (model.depth - 2) // 6
    conv3 = lambda s: dict(op="conv", kernel_hw=(3, 3), strides=(s, s), pads=((1, 1), (1, 1)))
    blocks = [f"stage{s + 1}/block{i}" for s in range(3) for i in range(n)]
    next_in = [f"{blk}/conv1" for blk in blocks] + ["fc"]
    b.layer("stem", bn="stem_bn", relu=True, out=b.act(next_in[0]), **conv3(1))
    res_qmax = 2 ** (RESIDUAL_BITS - 1) - 1
    pooled = -(-input_shape[0] // 4) * -(-input_shape[1] // 4)  # spatial size after two stride-2 stages
    for j, blk in enumerate(blocks):
        s_in, z_in, _ = b.act(f"{blk}/conv1")
        nxt = b.act(next_in[j + 1])
        s_res = nxt[0] / 2**_RES_FRACTION_BITS
        res = (s_res, 0, (-res_qmax, res_qmax))
        stride = 2 if (j >= n and j % n == 0) else 1
        width = model.width * 2 ** (j // n)
        in_width = width // 2 if stride > 1 else width
        b.layer(f"{blk}/conv1", bn=f"{blk}/bn1", relu=True, out=b.act(f"{blk}/conv2"), **conv3(stride))
        b.layer(f"{blk}/conv2", bn=f"{blk}/bn2", relu=False, out=res, **conv3(1))
        bm = {"strides": stride, "in_zero": z_in, "pad_channels": width - in_width, "shortcut": "identity"}
        arrays = {}
        if f"{blk}/shortcut/kernel" in b.params:
            bm["shortcut"] = "conv"
            b.layer(f"{blk}/shortcut", bn=f"{blk}/shortcut_bn", in_act=b.act(f"{blk}/conv1"), out=res,
                    op="conv", kernel_hw=(1, 1), strides=(stride, stride))
        else:
            b._requantizer(arrays, bm, "res", np.asarray(s_in / s_res), 0, (-res_qmax, res_qmax))
        # block output at the next layer's input scale; the last one is summed over space first
        # (integer average pooling), so 1/(HW) joins its multiplier
        divisor = pooled if j == len(blocks) - 1 else 1
        b._requantizer(arrays, bm, "out", np.asarray(s_res / (divisor * nxt[0])), nxt[1], nxt[2])
        b.arrays[blk], b.meta[blk] = arrays, bm
    b.layer("fc", relu=False, out=None)
    return {"kind": "resnet", "blocks": blocks}


def to_integer(qmodel: QuantizedModel, variables, input_shape, *, backend: str = "xla",
               pack_int4: bool = True) -> IntegerModel:
    """Convert a calibrated fake-quant model into an integer-only :class:`IntegerModel`.

    Parameters
    ----------
    qmodel : from :func:`hqjax.quantize_model` over an ``hqjax.models`` MLP (ReLU), CNN or
        CifarResNet (BatchNorm in inference mode is folded).
    variables : calibrated variables (``params``, ``batch_stats``, ``quant_stats``).
    input_shape : one example's shape, e.g. ``(8, 8, 1)`` (for SAME padding and pooling).
    backend : the ``int_matmul`` backend.
    pack_int4 : store weights of at most 4 bits packed two per byte (half the memory) and
        multiply them with :func:`hqjax.kernels.int4_matmul`; the integers are the same.
    """
    from hqjax.models import CifarResNet

    b = _Builder(qmodel, variables, backend, pack_int4)
    if isinstance(qmodel.model, CifarResNet):
        top = _build_resnet(b, qmodel.model, input_shape)
    else:
        top = _build_chain(b, qmodel.model, input_shape)
    first = top["layers"][0] if top["kind"] == "chain" else "stem"
    s, z, rng = b.act(first)
    output_scale = b.meta.pop("output_scale")
    meta = {**top, "layer_meta": b.meta, "input_scale": s, "input_zero": z, "input_range": list(rng),
            "output_scale": output_scale, "bit_config": qmodel.bit_config,
            "act_mode": qmodel.act_mode, "input_shape": list(input_shape)}
    return IntegerModel(b.arrays, json.dumps(meta), backend)


# --------------------------------------------------------------------------- serialization
_SEP = "::"


def save_integer_model(im: IntegerModel, directory: str | os.PathLike) -> None:
    """Write ``arrays.npz`` (integer weights, int32 biases, multipliers, shifts) and
    ``model.json`` (layer order, geometry, zero points, scales, bit config) under ``directory``."""
    os.makedirs(directory, exist_ok=True)
    flat = {f"{layer}{_SEP}{k}": np.asarray(v) for layer, rec in im.arrays.items() for k, v in rec.items()}
    np.savez(os.path.join(directory, "arrays.npz"), **flat)
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump({"format": "hqjax.IntegerModel/1", "backend": im.backend, "meta": im.meta}, f, indent=1)


def load_integer_model(directory: str | os.PathLike, *, backend: str | None = None) -> IntegerModel:
    """Read a model written by :func:`save_integer_model` (same predictions, bit for bit)."""
    with open(os.path.join(directory, "model.json")) as f:
        doc = json.load(f)
    if doc.get("format") != "hqjax.IntegerModel/1":
        raise ValueError(f"{directory!r} does not hold an hqjax integer model (format {doc.get('format')!r})")
    arrays: dict[str, dict[str, Any]] = {}
    with np.load(os.path.join(directory, "arrays.npz")) as z:
        for key in z.files:
            layer, name = key.rsplit(_SEP, 1)
            arrays.setdefault(layer, {})[name] = jnp.asarray(z[key])
    return IntegerModel(arrays, json.dumps(doc["meta"]), backend or doc["backend"])
