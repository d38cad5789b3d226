"""Native convolution kernels (hqjax.kernels.cpu) vs XLA:CPU and oneDNN, side by side in one process.

Per layer: ResNet-20's weight gradients at batch 128 (NHWC/HWIO), XLA's (``jax.vjp`` of
``lax.conv_general_dilated`` in the weights, as in conv_formulations_jax.py) vs the native
kernel; and its forward convolutions (the stride-1 ones are also the shapes of its input
gradients), XLA's vs oneDNN's (jaxlib's custom call) vs the native forward kernel. Whole
model: ResNet-20 (batch 128) gradient, Hessian-vector product (jvp of grad) and linearized
HVP (``hqjax.hessian(..., linearize=True)``, residuals hoisted as jit arguments) with
plain XLA, ``accelerate(..., mode='onednn')``, ``mode='native'`` with oneDNN forward
convolutions (native weight gradients only: ``native_forward=False``) and ``mode='native'``
with native forward convolutions too. Medians of --repeats calls, the variants of a
row interleaved so that load from other processes hits them alike (per layer, the minimum
too: XLA's multi-threaded convolutions suffer far more from a loaded machine than the native
kernel does, so medians on a busy machine flatter the native kernel).

    python benchmarks/investigation/wgrad_native.py [--repeats 7] [--batch 128] [--skip-model]
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import hqjax
from hqjax.kernels.cpu import accelerate
from hqjax.kernels.cpu._library import library
from hqjax.kernels.cpu.conv_forward import forward_ffi_call, native_forward_status
from hqjax.kernels.cpu.conv_weight_grad import conv2d_weight_grad, native_wgrad_status
from hqjax.kernels.cpu.rewrite import Rewrites, rewrite


def cpu_convolutions(fn):
    return rewrite(fn, Rewrites(onednn=True))


def _with(fn, mode, fwd):
    return fn if mode == "xla" else accelerate(fn, mode=mode, native_forward=fwd)
from hqjax.models import ResNet20

LAYERS = [(32, 16, 16, 1), (16, 32, 32, 1), (8, 64, 64, 1), (32, 16, 32, 2)]  # H, CI, CO, stride; 3x3 SAME
FORWARD_LAYERS = [*LAYERS, (32, 3, 16, 1)]  # + the first layer


def interleaved(fns: dict, repeats: int) -> dict:
    """Median ms of each zero-argument function, called round-robin after one warm-up each."""
    for f in fns.values():
        jax.block_until_ready(f())
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            ts[k].append(time.perf_counter() - t)
    return {k: 1e3 * float(np.median(v)) for k, v in ts.items()} | {k + " min": 1e3 * float(np.min(v)) for k, v in ts.items()}


def hoisted(fn, example):
    """``jit`` of ``fn`` with its closed-over arrays (the linearization residuals) as arguments."""
    closed = jax.make_jaxpr(fn)(example)
    run = jax.jit(lambda consts, leaves: jax.core.eval_jaxpr(closed.jaxpr, consts, *leaves))
    return lambda v: run(closed.consts, jax.tree.leaves(v))


def layers(batch, repeats):
    rng = np.random.default_rng(0)
    print(f"| layer (H, CI->CO, stride), batch {batch} | XLA ms | native ms | speed-up | min XLA / native ms | max rel. error |")
    print("|---|---|---|---|---|---|")
    for h, ci, co, s in LAYERS:
        pad = ((1, 1), (1, 1))
        x = jnp.asarray(rng.standard_normal((batch, h, h, ci)), jnp.float32)
        w = jnp.asarray(0.1 * rng.standard_normal((3, 3, ci, co)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((batch, (h - 1) // s + 1, (h - 1) // s + 1, co)), jnp.float32)
        conv = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        xla = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
        native = jax.jit(functools.partial(conv2d_weight_grad, kernel_size=(3, 3), window_strides=(s, s), padding=pad))
        want, got = np.asarray(xla(x, w, dy)), np.asarray(native(x, dy))
        t = interleaved({"xla": lambda: xla(x, w, dy), "native": lambda: native(x, dy)}, repeats)
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"| {h}x{h}, {ci}->{co}, s{s} | {t['xla']:.2f} | {t['native']:.2f} | {t['xla'] / t['native']:.2f}x "
              f"| {t['xla min']:.2f} / {t['native min']:.2f} | {err:.1e} |", flush=True)


def forward_layers(batch, repeats):
    rng = np.random.default_rng(0)
    print(f"\n| forward conv (H, CI->CO, stride), batch {batch} | XLA ms | oneDNN ms | native ms | native vs oneDNN "
          f"| min XLA / oneDNN / native ms | max rel. error |")
    print("|---|---|---|---|---|---|---|")
    for h, ci, co, s in FORWARD_LAYERS:
        x = jnp.asarray(rng.standard_normal((batch, h, h, ci)), jnp.float32)
        w = jnp.asarray(0.1 * rng.standard_normal((3, 3, ci, co)), jnp.float32)
        conv = lambda x, w: lax.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        fns = {"xla": jax.jit(conv), "onednn": jax.jit(cpu_convolutions(conv)),
               "native": jax.jit(functools.partial(forward_ffi_call, window_strides=(s, s), padding=((1, 1), (1, 1))))}
        assert "hqjax_conv2d_forward_f32" in fns["native"].lower(x, w).as_text()
        assert "onednn" in fns["onednn"].lower(x, w).as_text()
        want = np.asarray(fns["xla"](x, w))
        err = max(np.abs(np.asarray(fns[k](x, w)) - want).max() / np.abs(want).max() for k in ("onednn", "native"))
        t = interleaved({k: (lambda f=f: f(x, w)) for k, f in fns.items()}, repeats)
        print(f"| {h}x{h}, {ci}->{co}, s{s} | {t['xla']:.2f} | {t['onednn']:.2f} | {t['native']:.2f} "
              f"| {t['onednn'] / t['native']:.2f}x | {t['xla min']:.2f} / {t['onednn min']:.2f} / {t['native min']:.2f} "
              f"| {err:.1e} |", flush=True)


def model(batch, repeats):
    k = jax.random.split(jax.random.key(0), 3)
    net, x = ResNet20(), jax.random.normal(k[0], (batch, 32, 32, 3))
    y = jax.random.randint(k[1], (batch,), 0, 10)
    variables = net.init(k[2], x, train=False)
    params = variables["params"]

    def loss(p):
        logits = net.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    v = hqjax.tree.tree_random_like(jax.random.key(1), params, "rademacher")
    variants = {"xla": ("xla", False), "onednn": ("onednn", False), "native wgrad": ("native", False),
                "native wgrad+fwd": ("native", True)}
    ops = {}
    for name, (m, fwd) in variants.items():
        grad = jax.jit(_with(jax.grad(loss), m, fwd))
        hvp = jax.jit(_with(lambda p, v: hqjax.hvp(loss, p, v), m, fwd))
        lin_fn = jax.linearize(_with(jax.grad(loss), m, fwd), params)[1]
        lin = hoisted(lambda v, f=lin_fn: f(v), v)
        jax.block_until_ready((grad(params), hvp(params, v), lin(v)))
        ops[name] = {"gradient": lambda g=grad: g(params), "HVP (jvp of grad)": lambda h=hvp: h(params, v),
                     "linearized HVP": lambda l=lin: l(v)}
    names = list(variants)
    print(f"\n| ResNet-20, batch {batch} | " + " | ".join(f"'{m}' ms" for m in names)
          + " | wgrad+fwd vs onednn | wgrad+fwd vs wgrad |")
    print("|---|---|---|---|---|---|---|")
    for op in ops["xla"]:
        t = interleaved({m: ops[m][op] for m in names}, repeats)  # medians (mins also returned)
        print(f"| {op} | " + " | ".join(f"{t[m]:.0f}" for m in names)
              + f" | {t['onednn'] / t['native wgrad+fwd']:.2f}x | {t['native wgrad'] / t['native wgrad+fwd']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-wgrad", action="store_true")
    args = ap.parse_args()
    ok, reason = native_wgrad_status()
    if not ok:
        raise SystemExit(f"native weight gradient unavailable: {reason}")
    isa = "AVX2+FMA" if library().hqjax_wgrad_isa() == 1 else "portable"
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, native kernel: {isa} micro-kernel\n")
    print(f"native forward: {native_forward_status()}")
    if not args.skip_wgrad:
        layers(args.batch, args.repeats)
    forward_layers(args.batch, args.repeats)
    if not args.skip_model:
        model(args.batch, args.repeats)
