"""Lower a traced fake-quant model to an integer program (HAWQ-V3, Yao et al. 2021, Sec. 3).

The one module that knows jaxpr primitives. It walks the flat equations of
:mod:`hqjax.quant._trace` and gives every float value of the model an integer representation
``x = S (q - z)`` — an integer register ``q``, a scale ``S`` (one per element, kept compact:
size 1 along every axis where it is constant), a zero point ``z`` — plus a pending real clip
``[lo, hi]`` (ReLU, ReLU6) applied where the value is next requantized. Layers and ops:

- ``Dense``/``Conv`` (any strides, padding, dilation, ``feature_group_count``): the input is
  requantized to the layer's calibrated activation quantizer (the fake-quant model's), the
  weights are the fake-quant model's integers, ``acc = q_x · q_w + b_int`` with
  ``b_int = round(b / (S_w S_x)) - z_x Σ q_w`` and scale ``S_w S_x`` per output channel;
- ``BatchNorm`` (inference) after a layer scales that channel scale by ``γ/σ`` (a negative
  factor negates the column) and joins its shift to the bias — the integer weights stay the
  fake-quant weights, so both models quantize the same numbers (HAWQ-V3 Eq. 3–4 fold before
  quantizing; the fake-quant model here quantizes the unfolded kernel);
- ReLU/ReLU6 (``max``/``min``/``clamp`` with constants): a pending clip, exact at the next
  requantization because rounding is monotone;
- residual ``add``: both branches rescaled (dyadic) to the finer of their scales, in int32;
- max-pool: integer max; average/global pooling and ``mean``: integer sums, the divisor
  divides the scale (so ``1/(HW)`` lands in the next dyadic multiplier);
- reshape, transpose, slice (strided), pad (with the zero point), concatenate (per-channel
  scales concatenate; no requantization needed).

Anything else raises one error naming the primitive and the module path, unless
``float_islands`` keeps it in float (dequantize -> float op -> requantize at the next layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from hqjax.kernels import pack_int4
from hqjax.quant._trace import Traced, _is_var, bind_eqn, layer_slice
from hqjax.quant.quantizers import QuantSpec, int_range
from hqjax.quant.requant import dyadic
from hqjax.tree import kernel_view_shape

__all__: list[str] = []

_I32 = (-(2**31), 2**31 - 1)
_LIMIT = 2.0**30  # intermediate integers stay below this in magnitude
_FRAC_BITS = 8  # extra accumulator resolution (see Lowerer._linear_arrays)
_PASS = {"copy", "copy_p", "convert_element_type", "optimization_barrier"}
_SHAPE = {"reshape", "squeeze", "broadcast_in_dim", "expand_dims"}
_FORWARD = _SHAPE | _PASS | {"transpose", "slice", "pad", "reduce_window_max", "concatenate"}
SUPPORTED = ("Dense/DenseGeneral, Conv (strides, padding, dilation, groups), BatchNorm (inference), "
             "ReLU/ReLU6, residual add, max/average/global pooling, mean, reshape, transpose, "
             "slice, pad, concatenate")


class Unsupported(Exception):
    """An equation this lowering has no integer form for (a reason, no path yet)."""


@dataclasses.dataclass(frozen=True)
class Value:
    """Integer representation of one float value: ``x = clip(scale (q - zero), lo, hi)``,
    ``q`` in register ``reg``; ``bound`` bounds ``|q - zero|``. ``dtype='float'`` is a float
    island value (no scale)."""

    reg: int
    dtype: str
    shape: tuple
    scale: np.ndarray | None = None
    zero: int = 0
    lo: float = -math.inf
    hi: float = math.inf
    bound: float = 0.0

    @property
    def clipped(self) -> bool:
        return self.lo > -math.inf or self.hi < math.inf


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the lowering reads besides the trace: ``variables`` flat by ``'path/leaf'``,
    ``act(path) -> (S, z, (qmin, qmax))`` of a layer's calibrated input quantizer (raises
    when missing), ``weight_spec(path) -> QuantSpec``, and whether to pack int4 weights."""

    variables: dict
    act: object
    weight_spec: object
    pack_int4: bool = True


def _compact(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, np.float64)
    for ax in range(s.ndim):
        if s.shape[ax] > 1 and np.all(s == s.take([0], axis=ax)):
            s = s.take([0], axis=ax)
    return s


def _reduce_to(s: np.ndarray, shape) -> np.ndarray:
    """``s`` (constant along every axis where ``shape`` is 1) reduced to ``shape``: a shape set by
    the program's structure, not by which values happen to be equal."""
    for ax, n in enumerate(shape):
        if n == 1 and s.shape[ax] > 1:
            s = s.take([0], axis=ax)
    return s


def _full(v: Value) -> np.ndarray:
    return np.broadcast_to(v.scale, (1, *v.shape[1:]))


def _const_scale(v: Value, axes) -> bool:
    return all(v.scale.shape[a] == 1 for a in axes)


def quantize_columns(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Host-side symmetric quantization of a ``(K, N)`` kernel, one scale per column, group of
    columns or tensor, with the float32 arithmetic of :func:`hqjax.quant.fake_quant` (so the
    integers are exactly the fake-quant model's)."""
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


class Lowerer:
    """Builds the program: ``steps`` (JSON-able dicts), ``arrays`` (integer constants by step
    name), ``islands`` (float functions) and ``island_meta`` (what each float step is)."""

    def __init__(self, traced: Traced, info: ModelInfo, float_islands: bool, share_program: bool = False):
        self.t, self.info, self.float_islands, self.share_program = traced, info, float_islands, share_program
        self.steps, self.arrays, self.islands, self.island_meta = [], {}, [], []
        self.layers: list[str] = []
        self.env: dict = {}
        self.nreg = 1
        self.cache: dict = {}
        self.linear: dict = {}  # out reg -> host data of the layer that produced it (BatchNorm folding)
        self.uses = Counter(v for e in traced.eqns for v in e.invars if _is_var(v))
        self.uses[traced.outvar] += 1

    # ------------------------------------------------------------------ plumbing
    def emit(self, op, ins, name=None, arrays=None, **static) -> int:
        reg, self.nreg = self.nreg, self.nreg + 1
        if arrays is not None:
            name = name or f"{op}{reg}"
            self.arrays[name] = {k: jnp.asarray(v) for k, v in arrays.items()}
        self.steps.append({"op": op, "ins": list(ins), "out": reg, **({"name": name} if name else {}), **static})
        return reg

    def read(self, v):
        if not _is_var(v):
            return np.asarray(v)
        if v in self.t.consts:
            return np.asarray(self.t.consts[v])
        return self.env[v]

    def settle(self, v: Value) -> Value:
        """Apply a pending clip now, in the integer domain (bounds rounded per element)."""
        if not v.clipped:
            return v
        s = v.scale
        lo = np.full(s.shape, _I32[0]) if v.lo == -math.inf else v.zero + np.round(v.lo / s)
        hi = np.full(s.shape, _I32[1]) if v.hi == math.inf else v.zero + np.round(v.hi / s)
        info = np.iinfo(np.int8 if v.dtype == "int8" else np.int32)
        lo, hi = (np.clip(b, info.min, info.max).astype(np.int32) for b in (lo, hi))
        reg = self.emit("clip", [v.reg], arrays={"lo": lo, "hi": hi})
        return dataclasses.replace(v, reg=reg, lo=-math.inf, hi=math.inf)

    def center(self, v: Value) -> Value:
        """``q - z`` in int32 (zero point 0), the form sums and additions need."""
        v = self.settle(v)
        if v.dtype == "int32" and v.zero == 0:
            return v
        reg = self.emit("center", [v.reg], arrays={"zero": np.int32(v.zero)})
        return dataclasses.replace(v, reg=reg, dtype="int32", zero=0)

    def requant(self, v: Value, scale, zero: int, rng, dtype: str = "int8", *, elide: bool = True) -> Value:
        """``v`` at the scalar or per-element ``scale`` with zero point ``zero``, clipped to
        ``rng`` and the pending clip (exact: rounding is monotone). A ``v`` already there is
        returned as it is, unless ``elide=False``: then a step is emitted all the same (the
        identity multiplier), so that the program's structure does not depend on the scales."""
        scale = np.asarray(scale, np.float64)  # its shape as given: array shapes never depend on values
        scale = scale.reshape((1,) * (len(v.shape) - scale.ndim) + scale.shape)
        if v.dtype == "float":
            if scale.size != 1:
                raise Unsupported("a float value re-entering the integer program needs a per-tensor scale")
            reg = self.emit("quant", [v.reg], arrays={"scale": np.float32(scale.ravel()[0]), "zero": np.int32(zero),
                                                      "qmin": np.int32(rng[0]), "qmax": np.int32(rng[1])})
            return Value(reg, "int8", v.shape, scale, int(zero), bound=float(max(rng[1] - zero, zero - rng[0])))
        key = (v.reg, scale.tobytes(), scale.shape, zero, tuple(rng), v.lo, v.hi, dtype, elide)
        if key in self.cache:
            return self.cache[key]
        s32 = np.float32(scale)
        lo = rng[0] if v.lo == -math.inf else np.maximum(rng[0], zero + np.round(np.float32(v.lo) / s32))
        hi = rng[1] if v.hi == math.inf else np.minimum(rng[1], zero + np.round(np.float32(v.hi) / s32))
        same = (elide and v.dtype == dtype and v.zero == zero
                and np.array_equal(*np.broadcast_arrays(v.scale, scale))
                and np.all(lo <= zero - v.bound) and np.all(hi >= zero + v.bound))
        if same:
            out = dataclasses.replace(v, lo=-math.inf, hi=math.inf)
        else:
            m, k = dyadic(_reduce_to(_full(v) / scale, np.broadcast_shapes(v.scale.shape, scale.shape)))
            reg = self.emit("requant", [v.reg], arrays={"m": m, "shift": k, "lo": np.asarray(lo, np.int32),
                                                        "hi": np.asarray(hi, np.int32), "in_zero": np.int32(v.zero),
                                                        "out_zero": np.int32(zero)}, dtype=dtype)
            bound = float(max(rng[1] - zero, zero - rng[0])) if dtype == "int8" else float(
                np.max(v.bound * _full(v) / scale) + 1)
            out = Value(reg, dtype, v.shape, scale, int(zero), bound=bound)
        self.cache[key] = out
        return out

    # ------------------------------------------------------------------ driver
    def run(self, input_act):
        """Lower the program; ``input_act`` is the input quantizer ``(S, z, (qmin, qmax))``, or
        None for an input held as it is (token ids, or floats meeting a float op first): a
        "float" value, which only float islands read."""
        shape = tuple(self.t.invar.aval.shape)
        if input_act is None:
            self.env[self.t.invar] = Value(0, "float", shape)
        else:
            s, z, rng = input_act
            self.env[self.t.invar] = Value(0, "int8", shape, np.full((1,) * len(shape), s), int(z),
                                           bound=float(max(rng[1] - z, z - rng[0])))
        for e in self.t.eqns:
            self.lower(e)
        if not _is_var(self.t.outvar) or self.t.outvar in self.t.consts:
            raise ValueError("the model output does not depend on its input; nothing to lower")
        out = self.env[self.t.outvar]
        if out.dtype == "float":
            return out.reg, None
        out = self.center(out)
        return out.reg, np.asarray(_full(out)[0]).tolist()

    def lower(self, e):
        ins = [self.read(v) for v in (e.invars[:1] if e.layer is not None else e.invars)]
        if e.layer is not None:
            layer = self.t.layers[e.layer]
            fn = self.layer if layer.kind in ("dense", "conv") else self.batchnorm
            self.env[e.outvars[0]] = fn(e, layer, ins[0])
            return
        try:
            if any(isinstance(v, Value) and v.dtype == "float" for v in ins):
                raise Unsupported("its input is a float island value")
            handler = getattr(self, "op_" + e.prim, None)
            if handler is None:
                raise Unsupported("no integer form")
            out = handler(e, *ins)
        except Unsupported as err:
            if not self.float_islands:
                raise ValueError(self.describe(e, str(err))) from None
            out = self.float_eqn(e, ins)
        self.env[e.outvars[0]] = out

    def describe(self, e, reason: str) -> str:
        path = e.module or "<top level>"
        mtype = self.t.modules.get(e.module)
        fn = f" (inside {'/'.join(e.functions)})" if e.functions else ""
        return (f"cannot lower op {e.prim!r}{fn} at module path {path!r}"
                f"{f' ({mtype})' if mtype else ''} to integer-only inference: {reason}. Supported: {SUPPORTED}. "
                f"Pass float_islands=True to keep such ops in float (dequantize -> float op -> requantize)")

    # ------------------------------------------------------------------ float islands
    def float_eqn(self, e, ins) -> Value:
        if len(e.outvars) != 1:
            raise ValueError(self.describe(e, "a float island op must have one output"))
        regs, pattern, avals = [], [], []
        for v, var in zip(ins, e.invars):
            if isinstance(v, Value):
                regs.append(self.dequant(v).reg)
                pattern.append(None)
                avals.append([list(var.aval.shape[1:]), str(var.aval.dtype)])
            else:
                pattern.append(v)
        eqn = e.eqn

        def one(*xs):
            it = iter(xs)
            args = [next(it)[None] if p is None else p for p in pattern]
            return bind_eqn(eqn, args)[0][0]

        self.islands.append(jax.vmap(one))
        self.island_meta.append({"path": e.module, "module": self.t.modules.get(e.module), "op": e.prim,
                                 "functions": list(e.functions)})
        reg = self.emit("float", regs, island=len(self.islands) - 1, in_avals=avals)
        return Value(reg, "float", tuple(e.outvars[0].aval.shape))

    def dequant(self, v: Value) -> Value:
        if v.dtype == "float":
            return v
        key = ("dequant", v.reg, v.lo, v.hi)
        if key not in self.cache:
            reg = self.emit("dequant", [v.reg], arrays={"scale": np.asarray(v.scale, np.float32),
                                                        "zero": np.float32(v.zero), "lo": np.float32(v.lo),
                                                        "hi": np.float32(v.hi)})
            self.cache[key] = Value(reg, "float", v.shape)
        return self.cache[key]

    # ------------------------------------------------------------------ layers
    def layer(self, e, layer, x) -> Value:
        path, var = layer.path, self.info.variables
        if f"{path}/kernel" not in var:
            raise ValueError(f"layer {path!r} ({layer.module_type}) has no kernel in the variables")
        kernel = np.asarray(var[f"{path}/kernel"], np.float32)
        bias = var.get(f"{path}/bias")
        spec = self.info.weight_spec(path)
        # the fake-quant model's integers and scales, element by element, from the kernel's view
        view = kernel_view_shape(kernel.shape, None if bias is None else np.shape(bias))
        if spec.mode != "symmetric" or (spec.axis is not None and spec.axis % len(view) != len(view) - 1):
            raise ValueError(f"layer {path!r}: integer inference needs symmetric weights with scales per output "
                             f"channel (axis=-1), per group of output channels, or per tensor; got {spec}")
        q_view, s_view = quantize_columns(kernel.reshape(-1, view[-1]), spec)
        q_elem = q_view.reshape(kernel.shape)
        s_elem = np.broadcast_to(s_view, (q_view.shape[0], view[-1])).reshape(kernel.shape)
        bias = np.zeros(kernel.shape[-1]) if bias is None else np.asarray(bias, np.float64).reshape(-1)
        s_x, z_x, rng = self.info.act(path)
        step = {}
        y_shape = tuple(e.outvars[0].aval.shape)
        out_axes = kernel.shape[-1:]  # the output feature axes (several for LinearGeneral's out_features)
        if layer.kind == "conv":
            conv = self._one(layer, layer_slice(self.t, e, "conv_general_dilated"), "convolution")
            p, nd = conv.params, len(y_shape)
            dn = p["dimension_numbers"]
            chan_last = (0, nd - 1, *range(1, nd - 1))
            if tuple(dn.lhs_spec) != chan_last or tuple(dn.out_spec) != chan_last or tuple(dn.rhs_spec) != (
                    nd - 1, nd - 2, *range(nd - 2)):
                raise ValueError(f"layer {path!r}: integer convolutions take channels-last inputs and "
                                 f"(*window, in, out) kernels; got dimension numbers {dn}")
            if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
                raise ValueError(f"layer {path!r}: transposed (input-dilated) or batch-grouped convolutions have no "
                                 f"integer form here")
            step["conv"] = {"kernel": list(kernel.shape[:-2]), "strides": list(p["window_strides"]),
                            "pads": [list(q) for q in p["padding"]], "dilation": list(p["rhs_dilation"])}
            groups = int(p["feature_group_count"])
        else:
            dot = self._one(layer, layer_slice(self.t, e, "dot_general"), "matrix product")
            (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
            xnd, k = len(x.shape), len(lc)
            if lb or rb or tuple(lc) != tuple(range(xnd - k, xnd)) or tuple(rc) != tuple(range(k)):
                raise ValueError(f"layer {path!r}: integer Dense layers contract the trailing input axes with the "
                                 f"leading kernel axes; got dimension numbers {dot.params['dimension_numbers']}")
            if layer_slice(self.t, e, "transpose"):  # an einsum putting the kernel's axes before the input's
                raise ValueError(f"layer {path!r} ({layer.module_type}): its product's axes are reordered; integer "
                                 f"Dense layers keep the input's leading axes first ('...i,io->...o')")
            if k > 1 or kernel.ndim > 2:
                step["in_reshape"] = [*x.shape[1:xnd - k], int(np.prod(x.shape[xnd - k:]))]
                step["out_reshape"] = list(y_shape[1:])
                out_axes = kernel.shape[k:]
                kernel = kernel.reshape(int(np.prod(kernel.shape[:k])), -1)
            groups = 1
        n_out = kernel.shape[-1]
        q_w, s_cols = q_elem.reshape(-1, n_out), s_elem.reshape(-1, n_out)
        if np.any(s_cols != s_cols[:1]):
            raise ValueError(f"layer {path!r}: its weight scales vary along the contracted axes (kernel "
                             f"{tuple(q_elem.shape)}, bias {tuple(np.shape(var.get(f'{path}/bias')))}); "
                             f"integer inference needs one scale per output column")
        s_w = s_cols[0]
        if groups > 1:  # block-diagonal kernel over all input channels: one matmul through the same kernels
            win, cg, og = int(np.prod(kernel.shape[:-2])), kernel.shape[-2], n_out // groups
            full = np.zeros((win, cg * groups, n_out), np.int8)
            qg = q_w.reshape(win, cg, n_out)
            for g in range(groups):
                full[:, g * cg:(g + 1) * cg, g * og:(g + 1) * og] = qg[:, :, g * og:(g + 1) * og]
            q_w = full.reshape(-1, n_out)
        xq = self.requant(x, s_x, z_x, rng)
        host = {"name": path, "q_w": q_w, "s_acc": s_w.astype(np.float64) * s_x, "bias": bias, "z_x": int(z_x),
                "x_bound": xq.bound, "bits": spec.bits}
        reg = self.emit("linear", [xq.reg], name=path, **step)
        host["step"] = self.steps[-1]
        arrays, scale, bound = self._linear_arrays(host)
        self.arrays[path] = {k: jnp.asarray(v) for k, v in arrays.items()}
        self.layers.append(path)
        self.linear[reg] = host
        scale = scale.reshape((1,) * (len(y_shape) - len(out_axes)) + tuple(out_axes))
        return Value(reg, "int32", y_shape, scale, bound=bound)

    @staticmethod
    def _one(layer, found, what):
        if len(found) != 1:
            raise ValueError(f"layer {layer.path!r} ({layer.module_type}): expected one {what} in its trace, "
                             f"found {len(found)}")
        return found[0]

    def _linear_arrays(self, host):
        """Integer kernel and bias of a layer, with ``f`` fraction bits: ``acc = (q·w) 2^f + b_int``
        at scale ``S_w S_x / 2^f``, so the rounded bias (and every later rescaling) errs by
        ``2^-f`` of an accumulator step instead of one."""
        q_w, s_acc, path = host["q_w"], host["s_acc"], host["name"]
        q64 = q_w.astype(np.int64)
        zfix = host["z_x"] * q64.sum(0)
        # bounds every intermediate: the uncentred product (|q| <= 128), the zero-point term, the bias
        raw = np.abs(q64).sum(0) * max(128.0, host["x_bound"]) + np.abs(host["bias"] / s_acc) + np.abs(zfix)
        f = int(np.clip(np.floor(np.log2(_LIMIT / max(float(raw.max()), 1.0))), 0, _FRAC_BITS))
        bias = np.round(host["bias"] * 2.0**f / s_acc) - zfix * 2**f
        bound = float(np.max(np.abs(q64).sum(0) * host["x_bound"] * 2**f + np.abs(bias)))
        if raw.max() * 2**f >= _LIMIT or bound >= _LIMIT:
            raise ValueError(f"layer {path!r}: its int32 accumulator can overflow (scale {s_acc.min():.3g}, "
                             f"bound {raw.max():.3g}); check calibration")
        if self.info.pack_int4 and host["bits"] <= 4:
            arrays = {"w4": pack_int4(jnp.asarray(q_w, jnp.int8), axis=0)}
        else:
            arrays = {"w": np.asarray(q_w, np.int8)}
        arrays["bias"] = bias.astype(np.int32)
        arrays["in_zero"], arrays["frac_bits"] = np.int32(host["z_x"]), np.int32(f)
        return arrays, s_acc / 2.0**f, bound

    def batchnorm(self, e, layer, x) -> Value:
        path, var, a = layer.path, self.info.variables, layer.attrs
        if not a["inference"]:
            raise ValueError(f"BatchNorm {path!r} is in training mode; integer inference folds its running "
                             f"averages: call the Linen model with train=False / the NNX model after .eval()")
        if not a["axis_ok"]:
            raise ValueError(f"BatchNorm {path!r}: integer inference folds BatchNorm over the last (channel) axis only")
        c = var[f"{path}/mean"].shape[-1]
        gamma = np.asarray(var.get(f"{path}/scale", np.ones(c)), np.float64)
        beta = np.asarray(var.get(f"{path}/bias", np.zeros(c)), np.float64)
        mul = gamma / np.sqrt(np.asarray(var[f"{path}/var"], np.float64) + a["epsilon"])
        shift = beta - np.asarray(var[f"{path}/mean"], np.float64) * mul
        mul = np.where(mul == 0, 1e-30, mul)
        if x.dtype == "float":
            return self.float_affine(e, x, mul, shift)
        host = self.linear.get(x.reg)
        if host is not None and self.uses[e.invars[0]] == 1 and not x.clipped:
            sign = np.sign(mul)
            host = {**host, "q_w": (host["q_w"] * sign).astype(np.int8), "s_acc": host["s_acc"] * np.abs(mul),
                    "bias": host["bias"] * mul + shift}
            arrays, scale, bound = self._linear_arrays(host)
            self.arrays[host["name"]] = {k: jnp.asarray(v) for k, v in arrays.items()}
            self.linear[x.reg] = host
            return dataclasses.replace(x, scale=scale.reshape(x.scale.shape), bound=bound)
        x = self.center(x)  # BatchNorm elsewhere: a per-channel integer sign and offset
        scale = _compact(_full(x) * np.abs(mul))
        offset = np.round(np.broadcast_to(shift, scale.shape) / scale).astype(np.int32)
        reg = self.emit("affine", [x.reg], arrays={"sign": np.sign(mul).astype(np.int32), "offset": offset})
        return Value(reg, "int32", x.shape, scale, bound=x.bound + float(np.abs(offset).max()))

    def float_affine(self, e, x, mul, shift) -> Value:
        mul32, shift32 = jnp.asarray(mul, jnp.float32), jnp.asarray(shift, jnp.float32)
        self.islands.append(lambda y: y * mul32 + shift32)
        self.island_meta.append({"path": e.module, "module": "BatchNorm", "op": "batchnorm", "functions": []})
        reg = self.emit("float", [x.reg], island=len(self.islands) - 1, in_avals=[[list(x.shape[1:]), "float32"]])
        return Value(reg, "float", x.shape)

    # ------------------------------------------------------------------ elementwise clips (ReLU, ReLU6)
    @staticmethod
    def _scalar(c) -> float:
        if isinstance(c, Value) or np.size(c) != 1:
            raise Unsupported("only clips by a scalar constant (ReLU, ReLU6) have an integer form")
        return float(np.asarray(c).ravel()[0])

    def op_max(self, e, a, b):
        x, c = (a, b) if isinstance(a, Value) else (b, a)
        return dataclasses.replace(x, lo=max(x.lo, self._scalar(c)))

    def op_min(self, e, a, b):
        x, c = (a, b) if isinstance(a, Value) else (b, a)
        return dataclasses.replace(x, hi=min(x.hi, self._scalar(c)))

    def op_clamp(self, e, lo, x, hi):
        return dataclasses.replace(x, lo=max(x.lo, self._scalar(lo)), hi=min(x.hi, self._scalar(hi)))

    # ------------------------------------------------------------------ arithmetic with constants
    def _rescaled(self, x: Value, c, divide: bool) -> Value:
        c = np.asarray(c, np.float64)
        if np.any(c <= 0):
            raise Unsupported("scaling by a non-positive constant has no integer form here")
        if c.size != 1:
            x = self.settle(x)
        k = 1 / c if divide else c
        lo, hi = (x.lo * float(k.ravel()[0]), x.hi * float(k.ravel()[0])) if x.clipped else (x.lo, x.hi)
        scale = _compact(np.broadcast_to(_full(x) * k, np.broadcast_shapes((1, *x.shape[1:]), np.shape(k))))
        return dataclasses.replace(x, scale=scale, lo=lo, hi=hi)

    def op_div(self, e, a, b):
        if not isinstance(a, Value) or isinstance(b, Value):
            raise Unsupported("only division by a constant (average pooling, mean) has an integer form")
        return self._rescaled(a, b, divide=True)

    def op_mul(self, e, a, b):
        if isinstance(a, Value) == isinstance(b, Value):
            raise Unsupported("only multiplication by a constant has an integer form")
        x, c = (a, b) if isinstance(a, Value) else (b, a)
        return self._rescaled(x, c, divide=False)

    def op_add(self, e, a, b):
        if not (isinstance(a, Value) and isinstance(b, Value)):
            x, c = (a, b) if isinstance(a, Value) else (b, a)
            if np.any(np.asarray(c) != 0):
                raise Unsupported("adding a constant has no integer form here")
            return x
        a, b = self.center(a), self.center(b)
        fa, fb = _full(a), _full(b)
        # the finer of the two scales, coarsened only where the int32 sum could overflow
        common = np.maximum(np.minimum(fa, fb), (a.bound * fa + b.bound * fb) / _LIMIT)
        common = _reduce_to(common, np.broadcast_shapes(a.scale.shape, b.scale.shape))
        # which branch is already at the common scale depends on the calibration: a shared
        # program rescales both (one more step per add), a lean one only the other
        ra = self.requant(a, common, 0, _I32, "int32", elide=not self.share_program)
        rb = self.requant(b, common, 0, _I32, "int32", elide=not self.share_program)
        reg = self.emit("add", [ra.reg, rb.reg])
        return Value(reg, "int32", tuple(e.outvars[0].aval.shape), common, bound=ra.bound + rb.bound)

    # ------------------------------------------------------------------ pooling and sums
    def _window(self, e, x, op):
        p = e.params
        if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            raise Unsupported("dilated pooling windows have no integer form here")
        win, strides = list(p["window_dimensions"]), list(p["window_strides"])
        if win[0] != 1 or strides[0] != 1:
            raise Unsupported("pooling over the batch axis")
        if not _const_scale(x, [i for i, w in enumerate(win) if w > 1]):
            raise Unsupported("pooling over positions with different scales")
        static = {"window": win, "strides": strides, "padding": [list(q) for q in p["padding"]]}
        shape = tuple(e.outvars[0].aval.shape)
        if op == "max_pool":  # max commutes with the monotone quantizer and the pending clip
            return dataclasses.replace(x, reg=self.emit("max_pool", [x.reg], **static), shape=shape)
        x = self.center(x)
        return dataclasses.replace(x, reg=self.emit("sum_pool", [x.reg], **static), shape=shape,
                                   bound=x.bound * float(np.prod(win)))

    def op_reduce_window_max(self, e, x):
        return self._window(e, x, "max_pool")

    def op_reduce_window_sum(self, e, x):
        return self._window(e, x, "sum_pool")

    def op_reduce_sum(self, e, x):
        axes = sorted(int(a) for a in e.params["axes"])
        if 0 in axes or not _const_scale(x, axes):
            raise Unsupported("sums over the batch axis or over positions with different scales")
        x = self.center(x)
        scale = np.squeeze(x.scale, axis=tuple(axes))
        reg = self.emit("sum", [x.reg], axes=axes)
        return Value(reg, "int32", tuple(e.outvars[0].aval.shape), scale,
                     bound=x.bound * float(np.prod([x.shape[a] for a in axes])))

    # ------------------------------------------------------------------ layout
    def _reshaped(self, x: Value, shape) -> Value:
        shape = tuple(shape)
        if shape[0] != x.shape[0]:
            raise Unsupported("a reshape that moves the batch axis")
        if x.scale.size == 1:
            scale = x.scale.reshape((1,) * len(shape))
        else:
            scale = _compact(_full(x).reshape((1, *shape[1:])))
        reg = self.emit("reshape", [x.reg], sizes=list(shape[1:]))
        return dataclasses.replace(x, reg=reg, shape=shape, scale=scale)

    def op_reshape(self, e, x, *rest):
        return self._reshaped(x, e.outvars[0].aval.shape)

    def op_squeeze(self, e, x):
        return self._reshaped(x, e.outvars[0].aval.shape)

    def op_expand_dims(self, e, x):
        return self._reshaped(x, e.outvars[0].aval.shape)

    def op_broadcast_in_dim(self, e, x, *rest):
        shape = tuple(e.outvars[0].aval.shape)
        if not isinstance(x, Value) or int(np.prod(shape)) != int(np.prod(x.shape)):
            raise Unsupported("broadcasting has no integer form here")
        return self._reshaped(x, shape)

    def op_convert_element_type(self, e, x):
        if not jnp.issubdtype(e.params["new_dtype"], jnp.floating):
            raise Unsupported("conversion of an activation to an integer or boolean type")
        return x

    def op_copy(self, e, x):
        return x

    op_copy_p = op_copy

    def op_transpose(self, e, x):
        perm = list(e.params["permutation"])
        if perm[0] != 0:
            raise Unsupported("a transpose that moves the batch axis")
        reg = self.emit("transpose", [x.reg], perm=perm)
        return dataclasses.replace(x, reg=reg, shape=tuple(x.shape[i] for i in perm),
                                   scale=_compact(np.transpose(_full(x), perm)))

    def op_slice(self, e, x):
        p = e.params
        start, limit = list(p["start_indices"]), list(p["limit_indices"])
        strides = list(p["strides"] or [1] * len(start))
        if start[0] != 0 or limit[0] != x.shape[0] or strides[0] != 1:
            raise Unsupported("slicing the batch axis")
        idx = tuple(slice(a, b, s) if n > 1 else slice(None)
                    for a, b, s, n in zip(start, limit, strides, x.scale.shape))
        reg = self.emit("slice", [x.reg], start=start[1:], limit=limit[1:], strides=strides[1:])
        return dataclasses.replace(x, reg=reg, shape=tuple(e.outvars[0].aval.shape), scale=_compact(x.scale[idx]))

    def op_pad(self, e, x, value):
        if isinstance(value, Value) or np.any(np.asarray(value) != 0):
            raise Unsupported("padding with a value other than 0")
        config = [tuple(int(c) for c in t) for t in e.params["padding_config"]]
        if config[0] != (0, 0, 0):
            raise Unsupported("padding the batch axis")
        varying = [i for i, n in enumerate(x.scale.shape) if n > 1]
        if any(config[i] != (0, 0, 0) and (config[i][2] or min(config[i][:2]) < 0) for i in varying):
            raise Unsupported("interior or negative padding along an axis with per-channel scales")
        scale = np.pad(x.scale, [(c[0], c[1]) if i in varying else (0, 0) for i, c in enumerate(config)], mode="edge")
        reg = self.emit("pad", [x.reg], arrays={"value": np.int32(x.zero)}, config=[list(c) for c in config[1:]])
        return dataclasses.replace(x, reg=reg, shape=tuple(e.outvars[0].aval.shape), scale=scale)

    def op_concatenate(self, e, *xs):
        dim = int(e.params["dimension"])
        if dim == 0 or not all(isinstance(x, Value) for x in xs):
            raise Unsupported("concatenation along the batch axis or with constants")
        xs = [self.center(x) for x in xs]  # per-channel scales concatenate along with the values
        scale = _compact(np.concatenate([_full(x) for x in xs], axis=dim))
        reg = self.emit("concat", [x.reg for x in xs], axis=dim)
        return Value(reg, "int32", tuple(e.outvars[0].aval.shape), scale, bound=max(x.bound for x in xs))


def input_layer(traced: Traced) -> str:
    """The path of the first Dense/Conv the model input reaches through layout ops and
    max-pooling: its input quantizer quantizes the model input."""
    consumers: dict = {}
    for e in traced.eqns:
        for v in e.invars:
            if _is_var(v):
                consumers.setdefault(v, []).append(e)
    frontier, seen = [traced.invar], set()
    while frontier:
        v = frontier.pop(0)
        for e in consumers.get(v, []):
            if id(e) in seen:
                continue
            seen.add(id(e))
            if e.layer is not None and traced.layers[e.layer].kind in ("dense", "conv"):
                return traced.layers[e.layer].path
            if e.layer is not None or e.prim in _FORWARD:
                frontier.extend(e.outvars)
    raise ValueError("the model input reaches no Dense/Conv layer through reshape/pooling/layout ops, so there "
                     "is no calibrated input quantizer to quantize it with")
