"""Where one estimator step on a benchmark model spends its time on XLA:CPU.

Profiles ``--steps`` iterations of ``hqjax.top_eigenvalues`` (power iteration, host loop)
or ``hqjax.spectral_density`` (one SLQ run, ``reorth_passes=1``) on the benchmark's
linearized Hessian, and prints per-op device time per step from a ``jax.profiler`` trace
(mean over the steps; the first step's compile is outside the profile). ``--hvp`` also
profiles the linearized HVP alone, for the step's overhead.

    python benchmarks/investigation/profile_estimator_step.py --estimator power --hvp
    python benchmarks/investigation/profile_estimator_step.py --estimator slq --steps 100
"""
import argparse
import os
import sys

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from _profile import op_times, print_op_times  # noqa: E402
from curvature_vs_pyhessian import make_problem  # noqa: E402

import hqjax  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", choices=["resnet20", "mlp", "encoder"])
    ap.add_argument("--estimator", default="power", choices=["power", "slq"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--hvp", action="store_true", help="also profile the linearized HVP alone")
    ap.add_argument("--by-op", action="store_true", help="one row per op instead of per op kind")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    _, loss, params, _, _, _ = make_problem(args.model)
    key, n = jax.random.key(0), args.steps
    mv = hqjax.hessian(loss, params, linearize=True, check_finite=False)
    if args.hvp:
        jmv = jax.jit(mv)
        print(f"{args.model} linearized HVP, ms per call (mean of {n} runs)")
        print_op_times(op_times(lambda: jmv(params), repeats=n, by_kind=not args.by_op), args.top)
    if args.estimator == "power":
        run = lambda: hqjax.top_eigenvalues(mv, params, key, max_iters=n, tol=-1.0).eigenvalues
    else:
        run = lambda: hqjax.spectral_density(mv, params, key, num_steps=n, reorth_passes=1).nodes
    times = op_times(run, repeats=1, by_kind=not args.by_op)
    print(f"{args.model} {args.estimator}, ms per step (mean of {n} steps)")
    print_op_times({k: v / n for k, v in times.items()}, args.top)


if __name__ == "__main__":
    main()
