"""Cost of one estimator step against one HVP on the benchmark's MLP (1.86 M parameters).

The linearized HVP alone, then a Hutchinson probe, a power-iteration step (host and
device loop) and a Lanczos step. Each estimator runs with ``--short`` and ``--long``
iterations, taking turns (``interleaved_medians``); a step's cost is the difference over the
extra iterations, so tracing and the per-call checks (~0.1 s per call) do not count. This is
how the slow flattening of operator outputs was found (benchmarks/RESULTS.md, "Flattening
an operator's output").

    python benchmarks/investigation/mlp_estimator_steps.py
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import hqjax  # noqa: E402

hqjax.reuse_host_memory()

import jax  # noqa: E402
from _timing import interleaved_medians  # noqa: E402
from curvature_vs_pyhessian import hoisted, make_problem  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", choices=["resnet20", "mlp", "encoder"])
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    _, loss, params, _, _, _ = make_problem(args.model)
    mv = hqjax.hessian(loss, params, linearize=True, check_finite=False)
    key = jax.random.key(0)
    probe = hqjax.tree_random_like(jax.random.key(7), params, "rademacher")
    hvp = hoisted(mv, probe)[0]
    runs = {
        "Hutchinson probe": lambda n: hqjax.trace(mv, params, key, num_probes=n).total,
        "power step, host loop": lambda n: hqjax.top_eigenvalues(mv, params, key, max_iters=n, tol=-1.0).eigenvalues,
        "power step, device loop": lambda n: hqjax.top_eigenvalues(mv, params, key, max_iters=n, tol=-1.0,
                                                                   loop="device").eigenvalues,
        "Lanczos step (1 pass)": lambda n: hqjax.spectral_density(mv, params, key, num_steps=n, reorth_passes=1).nodes,
    }
    calls = [lambda: hvp(probe)]
    for run in runs.values():
        calls += [lambda run=run: run(args.short), lambda run=run: run(args.long)]
    ms = interleaved_medians(calls, repeats=args.repeats)
    print(f"{args.model}: medians of {args.repeats}, steps {args.short} and {args.long}")
    print("| op | ms per step | per call besides the steps (ms) |")
    print("|---|---:|---:|")
    print(f"| linearized HVP | {ms[0]:.1f} | |")
    for i, name in enumerate(runs):
        short, long = ms[1 + 2 * i], ms[2 + 2 * i]
        step = (long - short) / (args.long - args.short)
        print(f"| {name} | {step:.1f} | {short - args.short * step:.0f} |")


if __name__ == "__main__":
    main()
