"""Which formulation makes ResNet-20's gradient and HVP fast on XLA:CPU (the investigation
behind ``curvature_vs_pyhessian.py``; PyTorch is not needed here).

Same weights, batch (128 CIFAR-shaped images) and probe for every variant; the variants are
timed interleaved (one call of each per round) so machine contention hits all of them alike,
and compile time is reported apart. Variants:

- ``plain``: the loss over the whole batch, ``jax.jvp(jax.grad(f))`` (``hqjax.hvp``).
- ``lin``: the same, linearized once (``hqjax.hessian(f, params, linearize=True)``).
- ``mbK``: the batch split into K micro-batches, ``hqjax.dataset_loss(..., unroll=True)``
  (equal weights, so the same loss and the same Hessian, exactly).
- ``mbK-scan``: the same with ``lax.scan`` not unrolled (a convolution gradient inside a loop
  body; much slower on XLA:CPU, jax-ml/jax#12868).
- ``rr``: reverse-over-reverse with the first backward cached, as PyHessian does
  (``jax.vjp(jax.grad(f), params)`` once, then each product is the pullback; ``H`` is
  symmetric, so the pullback of ``v`` is ``H v``).
- ``eigen``: ``plain`` compiled with YNNPACK off (``xla_cpu_experimental_ynn_fusion_type=''``),
  i.e. XLA's Eigen convolutions instead of the default YNNPACK ones.

Run: ``python benchmarks/resnet_hvp_variants.py [--variants plain,lin,mb4,mb4-lin] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import optax

import hqjax
from hqjax.models import ResNet20

from curvature_vs_pyhessian import compile_clock, hoisted


def problem(batch=128, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    model, x = ResNet20(), jax.random.normal(k[0], (batch, 32, 32, 3))
    y = jax.random.randint(k[1], (batch,), 0, 10)
    variables = model.init(k[2], x, train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def batch_loss(p, xy):
        logits = model.apply({"params": p, "batch_stats": stats}, xy[0], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, xy[1]).mean()

    return batch_loss, params, (x, y)


def loss_for(variant, batch_loss, data):
    """The scalar loss a variant differentiates (all equal to the mean loss over the batch)."""
    if not variant.startswith("mb"):
        return lambda p: batch_loss(p, data)
    k = int(variant[2:].split("-")[0])
    stacked = jax.tree.map(lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:]), data)
    return hqjax.dataset_loss(batch_loss, stacked, unroll=not variant.endswith("-scan"))


def build(variant, batch_loss, params, data, probe):
    """``{op: thunk}`` for the gradient and the HVP of one variant, plus compile seconds."""
    f = loss_for(variant, batch_loss, data)
    opts = {"xla_cpu_experimental_ynn_fusion_type": ""} if variant.endswith("eigen") else {}
    with compile_clock() as c:
        grad = jax.jit(jax.grad(f)).lower(params).compile(compiler_options=opts)
    ops, comp = {"grad": lambda: grad(params)}, {"grad": c[0]}
    with compile_clock() as c:
        if variant.startswith("rr"):
            _, pullback = jax.vjp(jax.grad(f), params)
            apply, run, consts = hoisted(lambda v: pullback(v)[0], probe)
            leaves = jax.tree.leaves(probe)
            run_c = run.lower(consts, leaves).compile(compiler_options=opts)
            ops["hvp"] = lambda: run_c(consts, leaves)
        elif "lin" in variant:
            apply, run, consts = hoisted(hqjax.hessian(f, params, linearize=True, check_finite=False), probe)
            leaves = jax.tree.leaves(probe)
            run_c = run.lower(consts, leaves).compile(compiler_options=opts)
            ops["hvp"] = lambda: run_c(consts, leaves)
        else:
            hvp = jax.jit(lambda p, v: hqjax.hvp(f, p, v)).lower(params, probe).compile(compiler_options=opts)
            ops["hvp"] = lambda: hvp(params, probe)
    comp["hvp"] = c[0]
    return ops, comp


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="plain,lin,mb4,mb4-lin,mb8,eigen")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    batch_loss, params, data = problem()
    probe = hqjax.tree.tree_random_like(jax.random.key(7), params, "rademacher")
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()}")
    thunks, comp, ref = {}, {}, None
    for v in args.variants.split(","):
        ops, c = build(v, batch_loss, params, data, probe)
        for op, fn in ops.items():
            thunks[f"{v}/{op}"], comp[f"{v}/{op}"] = fn, c[op]
            out = jax.block_until_ready(fn())
            if op == "hvp":  # every variant must compute the same H v
                flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(out)])
                ref = flat if ref is None else ref
                err = np.linalg.norm(flat - ref) / np.linalg.norm(ref)
                print(f"{v}: compile grad {c['grad']:.1f}s hvp {c['hvp']:.1f}s, |Hv - Hv_plain|/|Hv_plain| = {err:.1e}", flush=True)
    ts = {k: [] for k in thunks}
    for _ in range(args.rounds):
        for k, fn in thunks.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts[k].append(time.perf_counter() - t)
    print("\n| variant/op | median (ms) | min (ms) | vs plain | compile (s) |\n|---|---:|---:|---:|---:|")
    for k in ts:
        base = np.median(ts["plain/" + k.split("/")[1]]) if "plain/" + k.split("/")[1] in ts else np.nan
        print(f"| {k} | {1e3 * np.median(ts[k]):,.1f} | {1e3 * np.min(ts[k]):,.1f} | {base / np.median(ts[k]):.2f}x | {comp[k]:.1f} |")
    best = min((k for k in ts if k.endswith("/hvp")), key=lambda k: np.median(ts[k]))
    print(f"load average {os.getloadavg()}")
    print(f"fastest HVP: {best} at {1e3 * np.median(ts[best]):,.0f} ms "
          f"({np.median(ts['plain/hvp']) / np.median(ts[best]):.2f}x plain)" if "plain/hvp" in ts else f"fastest HVP: {best}")


if __name__ == "__main__":
    main()
