"""XLA's matrix products against hqjax's native strided GEMM inside the benchmark models' operators.

For each model, builds the jitted gradient, the HVP from scratch and the linearized HVP twice,
through ``hqjax.kernels.cpu.accelerate`` with ``native_matmul`` off and on (the products
``hqjax.kernels.cpu.matmul.matmul_form`` picks: weight gradients over tokens, batched
products, and weight gradients autodiff wrote as ``transpose(dy^T x)``), checks that the two HVPs agree, and times all six in turn (both sides use XLA's
thread pool, so one process is fair).

    python benchmarks/investigation/native_matmul.py --models encoder,mlp
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import hqjax  # noqa: E402
import hqjax.kernels.cpu  # noqa: E402

_HOST = hqjax.kernels.cpu.reuse_host_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _timing import interleaved_medians  # noqa: E402
from curvature_vs_pyhessian import make_problem  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from hqjax.kernels.cpu import accelerate  # noqa: E402


def build(loss, params, probe, native):
    grad = jax.jit(accelerate(jax.value_and_grad(loss), native_matmul=native))
    hvp = jax.jit(accelerate(lambda p, v: hqjax.hvp(loss, p, v), native_matmul=native))
    _, lin = jax.linearize(accelerate(jax.grad(loss), native_matmul=native), params)
    lin = jax.jit(lin)
    out = hvp(params, probe)
    jax.block_until_ready((grad(params), lin(probe)))
    return [lambda: grad(params), lambda: hvp(params, probe), lambda: lin(probe)], out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="encoder,mlp")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"hqjax.kernels.cpu.reuse_host_memory: {_HOST.applied or _HOST.reason}")
    print("| model | op | XLA's products (ms) | native GEMM (ms) | XLA / native |")
    print("|---|---|---:|---:|---:|")
    for model in args.models.split(","):
        _, loss, params, _, _, _ = make_problem(model)
        probe = hqjax.tree.tree_random_like(jax.random.key(7), params, "rademacher")
        xla, hv_xla = build(loss, params, probe, False)
        native, hv_native = build(loss, params, probe, True)
        a, b = ravel_pytree(hv_xla)[0], ravel_pytree(hv_native)[0]
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
        ms = interleaved_medians(xla + native, repeats=args.repeats)
        for i, op in enumerate(("gradient", "hvp, from scratch", "hvp, linearized")):
            print(f"| {model} | {op} | {ms[i]:.1f} | {ms[3 + i]:.1f} | {ms[i] / ms[3 + i]:.2f}x |")
        print(f"| {model} | HVP relative difference | {rel:.1e} | | |", flush=True)


if __name__ == "__main__":
    main()
