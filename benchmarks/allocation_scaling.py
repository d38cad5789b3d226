"""Solve time of the bit-allocation ILP against the number of layers, per OR-Tools backend.

Each instance has L layers x 4 candidate bit widths (2, 3, 4, 8; activations follow weights)
x 3 budgets (model size, BOPS, latency), every one binding, solved to proven optimality.
Layer sizes, MACs and latencies are drawn like a CNN's (parameters 1e3-1e6, 49-3,136 MACs
per weight, latency about linear in bits with ±10% noise); sensitivities are
HAWQ-V3-like ``trace * ||Q_b(W) - W||^2`` with the perturbation falling ~4x per bit.

    python benchmarks/allocation_scaling.py [--layers 50,200,1000,5000] [--repeats 3]

Columns: solve = the backend's wall time (with the LP reduction when it is on), total =
the whole ``hqjax.allocate`` call (building the cost matrices included), total cpu = that
call's process CPU time (all solver threads; on a shared machine it shows what the wall
time would be without contention for single-threaded CBC). There is no JIT compilation on
this path. The objective of every backend is compared with the first's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hqjax

BITS = (2, 3, 4, 8)
BUDGET = {"size": hqjax.alpha(0.37), "bops": hqjax.alpha(0.41), "latency": hqjax.alpha(0.45)}
# (label, backend, reduce)
VARIANTS = [
    ("CBC + LP reduction (default)", "CBC", True),
    ("CBC", "CBC", False),
    ("HiGHS + LP reduction", "HIGHS", True),
    ("CP-SAT + LP reduction", "CP-SAT", True),
    ("CP-SAT", "CP-SAT", False),
    ("SCIP + LP reduction", "SCIP", True),
]


def instance(num_layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = [f"layer{i}" for i in range(num_layers)]
    n = rng.integers(10**3, 10**6, size=num_layers)
    macs = n * rng.integers(49, 3136, size=num_layers)
    latency = {
        names[i]: {b: float(macs[i] * 1e-6 * (0.3 + 0.7 * b / 8) * rng.uniform(0.9, 1.1)) for b in BITS}
        for i in range(num_layers)
    }
    costs = hqjax.LayerCosts(dict(zip(names, n.tolist())), dict(zip(names, macs.tolist())), latency_us=latency)
    trace = rng.lognormal(0, 2, size=num_layers)
    scores = {names[i]: {b: float(trace[i] * n[i] * rng.uniform(0.8, 1.2) * 4.0**-b) for b in BITS} for i in range(num_layers)}
    return costs, scores


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="50,200,1000,5000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="all", help="comma-separated labels' backends, e.g. CBC,HIGHS; 'all'")
    ap.add_argument("--max-layers-slow", type=int, default=1000, help="SCIP and plain CP-SAT only up to this size")
    args = ap.parse_args()
    sizes = [int(s) for s in args.layers.split(",")]
    variants = VARIANTS if args.variants == "all" else [v for v in VARIANTS if v[1] in args.variants.upper().split(",")]
    print(f"{'layers':>7} | {'backend':<30} | {'solve s (median)':>16} | {'total s':>8} | {'total cpu':>9} | {'status':<8} | rel. objective diff")
    print("-" * 100)
    key = {}
    for L in sizes:
        costs, scores = instance(L)
        ref = None
        for label, backend, reduce in variants:
            if L > args.max_layers_slow and label in ("SCIP + LP reduction", "CP-SAT"):
                continue
            solve, total, cpu = [], [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                res = hqjax.allocate(scores, costs, BUDGET, BITS, act_candidates="weights", backend=backend, reduce=reduce)
                total.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                solve.append(res.solve_time_s)
            ref = res.objective if ref is None else ref
            diff = abs(res.objective - ref) / abs(ref)
            med = statistics.median(solve)
            key[(L, label)] = med
            print(f"{L:>7} | {label:<30} | {med:>16.3f} | {statistics.median(total):>8.3f} | "
                  f"{statistics.median(cpu):>9.3f} | {res.status:<8} | {diff:.1e}", flush=True)
    if (1000, VARIANTS[0][0]) in key:
        print(f"1,000 layers x 4 bit widths x 3 budgets, proven optimal: {key[(1000, VARIANTS[0][0])]:.3f} s "
              f"(CBC + LP reduction, median of {args.repeats})")


if __name__ == "__main__":
    main()
