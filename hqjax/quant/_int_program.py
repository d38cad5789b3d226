"""The integer program: a list of small steps and the one function that runs them.

A step is a JSON-able dict ``{"op", "ins", "out", ...}`` reading and writing numbered
registers; its integer constants (weights, biases, dyadic multipliers and shifts, clip bounds)
live in ``arrays[step["name"]]``. Register 0 holds the quantized input. Every product goes
through :func:`hqjax.kernels.int_matmul` / :func:`hqjax.kernels.int4_matmul` (convolutions as
patches + matmul, grouped ones with a block-diagonal kernel); requantization is HAWQ-V3's
dyadic ``round(acc · m / 2^k)`` (Yao et al. 2021, Eq. 6) in int32 arithmetic. Shapes are
batch-agnostic (the batch axis is always 0 and never named). Only the ``dequant`` /
``quant`` / ``float`` steps of a float island (an explicit opt-in of ``to_integer``) touch
floats.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
from jax import lax

from hqjax.kernels import int4_matmul, int_matmul
from hqjax.kernels.requant import dyadic_round

__all__ = ["run_program", "OPS"]

_I32 = (-(2**31), 2**31 - 1)


def _patches(x, kernel, strides, pads, dilation, pad_value):
    """Conv patches of channels-last ``x`` as ``(..., prod(kernel) * C)``, ordered like
    ``w.reshape(-1, O)`` of a ``(*kernel, C, O)`` kernel; padding uses ``pad_value`` (the
    integer of a real 0)."""
    nd = len(kernel)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=jnp.asarray(pad_value, x.dtype))
    out = [(xp.shape[1 + d] - (kernel[d] - 1) * dilation[d] - 1) // strides[d] + 1 for d in range(nd)]
    cols = []
    for offs in itertools.product(*(range(k) for k in kernel)):
        start = (0, *(o * dil for o, dil in zip(offs, dilation)), 0)
        limit = (xp.shape[0], *(s + (n - 1) * st + 1 for s, n, st in zip(start[1:], out, strides)), xp.shape[-1])
        cols.append(lax.slice(xp, start, limit, (1, *strides, 1)))
    return jnp.concatenate(cols, axis=-1)


def _const(step, a, key):
    """A calibration-dependent constant (a zero point, a range, a shift): an array argument, so
    that configurations differing only in such values share one compiled program (in the
    step itself in models saved before that)."""
    return a[key] if key in a else step[key]


def _linear(step, a, x, backend):
    if step.get("in_reshape"):
        x = x.reshape(-1, *step["in_reshape"])
    conv = step.get("conv")
    if conv:
        x = _patches(x, conv["kernel"], conv["strides"], [tuple(p) for p in conv["pads"]], conv["dilation"],
                     _const(step, a, "in_zero"))
    acc = int4_matmul(x, a["w4"], backend=backend) if "w4" in a else int_matmul(x, a["w"], backend=backend)
    frac = a.get("frac_bits", step.get("frac_bits", 0))
    if not isinstance(frac, int) or frac:  # finer accumulator scale: the bias rounds to 2^-f of a step
        acc = jnp.left_shift(acc, frac)
    acc = acc + a["bias"]
    if step.get("out_reshape"):
        acc = acc.reshape(-1, *step["out_reshape"])
    return acc


def _requant(step, a, x, backend):
    y = dyadic_round(x.astype(jnp.int32) - _const(step, a, "in_zero"), a["m"], a["shift"])
    y = jnp.clip(y, -(2**30), 2**30) + _const(step, a, "out_zero")  # saturate before the zero point is added
    y = jnp.clip(y, a["lo"], a["hi"])
    return y.astype(jnp.int8 if step["dtype"] == "int8" else jnp.int32)


def _clip(step, a, x, backend):
    return jnp.clip(x, a["lo"], a["hi"]).astype(x.dtype)


def _center(step, a, x, backend):
    return x.astype(jnp.int32) - _const(step, a, "zero")


def _add(step, a, x, y, backend):
    return x + y


def _concat(step, a, *xs, backend):
    return jnp.concatenate(xs, axis=step["axis"])


def _window(step, x, init, fn):
    return lax.reduce_window(x, jnp.asarray(init, x.dtype), fn, tuple(step["window"]), tuple(step["strides"]),
                             [tuple(p) for p in step["padding"]])


def _max_pool(step, a, x, backend):
    return _window(step, x, jnp.iinfo(x.dtype).min, lax.max)


def _sum_pool(step, a, x, backend):
    return _window(step, x, 0, lax.add)


def _sum(step, a, x, backend):
    return jnp.sum(x, axis=tuple(step["axes"]), dtype=jnp.int32)


def _reshape(step, a, x, backend):
    return x.reshape(-1, *step["sizes"])


def _transpose(step, a, x, backend):
    return jnp.transpose(x, step["perm"])


def _slice(step, a, x, backend):
    return lax.slice(x, (0, *step["start"]), (x.shape[0], *step["limit"]), (1, *step["strides"]))


def _pad(step, a, x, backend):
    return lax.pad(x, jnp.asarray(_const(step, a, "value"), x.dtype), [(0, 0, 0), *(tuple(c) for c in step["config"])])


def _affine(step, a, x, backend):
    return x * a["sign"] + a["offset"]


def _dequant(step, a, x, backend):
    y = a["scale"] * (x.astype(jnp.float32) - _const(step, a, "zero"))
    return jnp.clip(y, _const(step, a, "lo"), _const(step, a, "hi"))


def _quant(step, a, x, backend):
    q = jnp.round(x / _const(step, a, "scale")) + _const(step, a, "zero")
    return jnp.clip(q, _const(step, a, "qmin"), _const(step, a, "qmax")).astype(jnp.int8)


OPS = {"linear": _linear, "requant": _requant, "clip": _clip, "center": _center, "add": _add,
       "concat": _concat, "max_pool": _max_pool, "sum_pool": _sum_pool, "sum": _sum, "reshape": _reshape,
       "transpose": _transpose, "slice": _slice, "pad": _pad, "affine": _affine, "dequant": _dequant,
       "quant": _quant}


def run_program(program, arrays, q, out: int, backend: str, islands=()):
    """Run ``program`` (a list of steps) on the quantized input ``q`` (register 0) and return
    register ``out``; ``islands`` holds the float functions of ``float`` steps."""
    regs = {0: q}
    for step in program:
        ins = [regs[i] for i in step["ins"]]
        if step["op"] == "float":
            regs[step["out"]] = islands[step["island"]](*ins)
        else:
            regs[step["out"]] = OPS[step["op"]](step, arrays.get(step.get("name"), {}), *ins, backend=backend)
    return regs[out]
