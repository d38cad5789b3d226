"""Estimator cost beyond the matvecs: SLQ density and power iteration on the benchmark's MLP.

Runs the estimators of whatever hqjax is importable (use PYTHONPATH to compare two checkouts
side by side) on the 1.86 M-parameter MLP of ``curvature_vs_pyhessian.py``, with its
linearized Hessian and with a near-free operator (``v -> 2 v``) that leaves only the
estimator's own work: Gram-Schmidt against the Krylov basis, the loop's dispatch and sync.

    python benchmarks/investigation/estimator_overhead.py --steps 100 --repeats 3
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hqjax  # noqa: E402
from curvature_vs_pyhessian import make_problem  # noqa: E402


def median_s(call, repeats):
    jax.block_until_ready(jax.tree.leaves(call()))  # compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(jax.tree.leaves(call()))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    _, loss, params, _, _, _ = make_problem("mlp")
    ops = {"hessian": hqjax.hessian(loss, params, linearize=True, check_finite=False),
           "2v": lambda v: jax.tree.map(lambda a: 2 * a, v)}
    key, m = jax.random.key(0), args.steps
    import inspect
    has_passes = "reorth_passes" in inspect.signature(hqjax.spectral_density).parameters
    print(f"hqjax from {os.path.dirname(hqjax.__file__)}; {m} steps/iterations; medians of {args.repeats}")
    print("| operator | estimator | total (s) | per step (ms) |\n|---|---|---:|---:|")
    for name, mv in ops.items():
        rows = {"power": lambda: hqjax.top_eigenvalues(mv, params, key, max_iters=m, tol=-1.0),
                "density (2 passes)": lambda: hqjax.spectral_density(mv, params, key, num_steps=m)}
        if has_passes:
            rows["density (1 pass)"] = lambda: hqjax.spectral_density(mv, params, key, num_steps=m, reorth_passes=1)
        for row, call in rows.items():
            s = median_s(call, args.repeats)
            print(f"| {name} | {row} | {s:.2f} | {1e3 * s / m:.1f} |", flush=True)


if __name__ == "__main__":
    main()
