"""Accuracy of Hessian-aware mixed precision against uniform, random and reversed allocations.

The ablation of HAWQ-V2 (Dong et al. 2020, Sec. 4.3) and HAWQ-V3 (Yao et al. 2021, Sec. 4):
at the same model size, does the allocation chosen from Hessian traces (HAWQ-V3 Eq. 12)
beat a random allocation and the reversed one (most sensitive layers get the fewest bits)?

For each data set and seed, the job's own stages train the full-precision CNN and measure
per-layer Hessian traces (``hqjax.pipeline.run_stages(..., until='analyze')``); then every
configuration below is calibrated, fine-tuned with QAT for the same number of epochs and
converted to integer-only (``hqjax.pipeline.quantize_finetune``):

- uniform W8A8, W4A8, W3A8, W2A8;
- at the size of uniform W4 and of uniform W3 (bytes, biases at 32 bits), with that width
  removed from the candidates (so every allocation mixes bit widths: W4 size from {2,3,8},
  W3 size from {2,4,8}):
  ``hawq``: the ILP with the HAWQ-V3 metric ``Tr(H_l) ||Q_b(W_l) - W_l||^2``;
  ``random``: a uniformly random configuration using 90-100% of the budget;
  ``reversed``: the same ILP with the traces given to the layers in reversed rank order
  (the most sensitive layer gets the smallest trace, so the fewest bits).

Reports fake-quant and integer-only test accuracy, mean ± std over seeds.

    python benchmarks/accuracy_table.py --datasets digits --seeds 0 1 2
    python benchmarks/accuracy_table.py --datasets mnist_subset --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def _scores_with_traces(rows, traces: dict[str, float], bits) -> dict[str, dict[int, float]]:
    """``{layer: {b: t_l * ||Q_b(W_l) - W_l||^2}}`` (HAWQ-V3 Eq. 12 with ``t_l`` the average trace)."""
    return {r["layer"]: {b: traces[r["layer"]] * r["perturbation"][str(b)] for b in bits} for r in rows}


def _reversed_average_traces(rows) -> dict[str, float]:
    """Average traces ``Tr(H_l)/n_l`` handed out in reversed rank order (most sensitive gets the least)."""
    avg = {r["layer"]: r["trace"] / r["n_params"] for r in rows}
    by_rank = sorted(avg, key=lambda n: -avg[n])
    return {n: avg[by_rank[len(by_rank) - 1 - i]] for i, n in enumerate(by_rank)}


def random_allocation(names, costs, bits, act_bits, limit, rng, fill: float = 0.9) -> dict:
    """A uniformly random BitConfig among those within the limit using at least ``fill`` of
    the largest size that fits (enumerated: the models here have a handful of layers)."""
    configs = np.array(np.meshgrid(*[bits] * len(names), indexing="ij")).reshape(len(names), -1).T
    sizes = np.array([sum(costs.size_bytes(n, int(b)) for n, b in zip(names, c)) for c in configs])
    fits = sizes <= limit * (1 + 1e-12)
    ok = np.flatnonzero(fits & (sizes >= fill * sizes[fits].max()))
    pick = configs[rng.choice(ok)]
    return {n: {"weight_bits": int(b), "act_bits": act_bits} for n, b in zip(names, pick)}


def allocations(rows, costs, bits, act_bits, limit, rng, kinds=("hawq", "random", "reversed")) -> dict[str, dict]:
    """The hawq / random / reversed (and the total-trace ablation) BitConfigs at one size limit (bytes).

    ``hawq`` is the registered ``hawq_v3`` metric, ``Tr(H_l)/n_l ||Q_b(W_l) - W_l||^2``;
    ``total-trace`` the ``total_trace`` ablation ``Tr(H_l) ||Q_b(W_l) - W_l||^2``.
    """
    from hqjax.alloc import allocate
    from hqjax.pipeline import sensitivity_from_rows

    reversed_traces = _reversed_average_traces(rows)
    budget = {"size": limit * (1 + 1e-12)}
    out = {}
    for kind in kinds:
        if kind == "random":
            out[kind] = random_allocation([r["layer"] for r in rows], costs, bits, act_bits, limit, rng)
            continue
        if kind == "reversed":
            table, metric = _scores_with_traces(rows, reversed_traces, bits), None
        else:
            table, metric = sensitivity_from_rows(rows), {"hawq": "hawq_v3", "total-trace": "total_trace", "hawq-v2": "hawq_v2"}[kind]
        out[kind] = allocate(table, costs, budget, candidates=bits, act_candidates=(act_bits,),
                             **({"metric": metric} if metric else {})).bit_config
    return out


def frontier_divergence(rows, costs, bits, act_bits, num: int = 40) -> dict:
    """Where along the size axis do the hawq and reversed allocations differ?

    Solves both ILPs at ``num`` budgets from all-lowest to all-highest bits and counts the
    budgets where they choose different bits, and how many configurations lie within
    90-100% of each budget (the freedom the budget leaves to any sensitivity ordering).
    """
    from hqjax.alloc import allocate

    names = [r["layer"] for r in rows]
    traces = {r["layer"]: r["trace"] / r["n_params"] for r in rows}
    rev = _reversed_average_traces(rows)
    configs = np.array(np.meshgrid(*[bits] * len(names), indexing="ij")).reshape(len(names), -1).T
    sizes = np.array([sum(costs.size_bytes(n, int(b)) for n, b in zip(names, c)) for c in configs])
    lo, hi = sizes.min(), sizes.max()
    differ, freedom = [], []
    for limit in np.linspace(lo, hi, num):
        pick = [allocate(_scores_with_traces(rows, t, bits), costs, {"size": limit * (1 + 1e-12)}, candidates=bits,
                         act_candidates=(act_bits,)).weight_bits for t in (traces, rev)]
        freedom.append(int(np.sum((sizes <= limit * (1 + 1e-12)) & (sizes >= 0.9 * limit))))
        if pick[0] != pick[1]:
            differ.append({"size": float(limit), "hawq": "/".join(str(pick[0][n]) for n in names),
                           "reversed": "/".join(str(pick[1][n]) for n in names)})
    return {"budgets": num, "differ": differ, "median_freedom": float(np.median(freedom)),
            "share_of_weights": {n: costs.n_weights[n] / sum(costs.n_weights.values()) for n in names}}


def second_order_check(job, bits=(2, 3, 4)) -> list[dict]:
    """Does the quadratic model behind the HAWQ metrics predict the loss of quantizing a layer?

    For each layer alone and each width, the measured training-loss increase
    ``L(Q_l(W)) - L(W)`` (weights of that layer fake-quantized, everything else float)
    against HAWQ-V2's prediction ``1/2 Tr(H_l)/n_l ||Q_b(W_l) - W_l||^2`` (Eq. 4, the gradient
    taken as zero at the trained point).
    """
    import jax

    from hqjax.curvature import dataset_loss
    from hqjax._analyze import analysis_batches
    from hqjax.quant import quantize_params
    from hqjax.train import make_loss_fn

    params = job.variables["params"]
    batches, counts = analysis_batches(job)
    f = jax.jit(dataset_loss(make_loss_fn(job.model, job.variables), batches, counts, unroll=True))
    base = float(f(params))
    out = []
    for r in job.work.read_json("sensitivity.json")["layers"]:
        for b in bits:
            q = quantize_params(params, {r["layer"]: {"weight_bits": b, "act_bits": None}})
            predicted = 0.5 * r["trace"] / r["n_params"] * r["perturbation"][str(b)]
            out.append({"layer": r["layer"], "bits": b, "measured": float(f(q)) - base, "predicted": predicted})
    return out


def run_seed(dataset: str, seed: int, args) -> list[dict]:
    from hqjax.config import RunConfig
    from hqjax.pipeline import integer_accuracy, layer_costs, quantize_finetune, run_stages, uniform_cost
    from hqjax.quant import uniform_bit_config
    from hqjax.train import accuracy

    cfg = RunConfig(model="cnn", dataset=dataset, seed=seed, out=os.path.join(args.work, f"{dataset}-s{seed}"),
                    epochs=args.epochs, num_probes=args.probes, qat_epochs=args.qat_epochs,
                    hessian_examples=args.hessian_examples,
                    weight_bits=tuple(args.bits), density_steps=8, eig_iters=10, top_k=1)
    job = run_stages(cfg, "analyze", log=lambda s: None, progress=False)
    d = job.dataset
    rows = job.work.read_json("sensitivity.json")["layers"]
    names = [r["layer"] for r in rows]
    costs = layer_costs(job)
    rng = np.random.default_rng(1000 + seed)
    configs = {}
    if not args.skip_uniform:
        configs["full precision"] = None
        for b in (8, 4, 3, 2):
            configs[f"uniform W{b}A8"] = uniform_bit_config(names, b, 8)
    for b in args.budgets:
        # a budget "W b" is the size of uniform b-bit weights (interpolated for fractional b).
        # An integer width is left out of the candidates: with it, every allocation picked
        # uniform b on these models (the layer sizes leave no cheaper trade; RESULTS.md)
        lo, frac = int(np.floor(b)), b - np.floor(b)
        limit = (1 - frac) * uniform_cost(costs, "size", names, lo, 8) + frac * uniform_cost(costs, "size", names, lo + 1, 8)
        cands = [x for x in args.bits if x != b] if frac == 0 else list(args.bits)
        for kind, bc in allocations(rows, costs, cands, 8, limit, rng, args.kinds).items():
            configs[f"{kind} @W{b:g} size"] = bc
    results = []
    for label, bc in configs.items():
        t0 = time.perf_counter()
        if bc is None:
            fq = accuracy(job.model.apply, job.variables, d.x_test, d.y_test)
            res = {"config": label, "fake_quant": fq, "integer": None, "size": uniform_cost(costs, "size", names, 32, 8)}
        else:
            qmodel, _, qat, integer = quantize_finetune(job, bc)
            res = {"config": label, "fake_quant": accuracy(qmodel.apply, qat, d.x_test, d.y_test),
                   "integer": integer_accuracy(integer, d.x_test, d.y_test),
                   "size": float(sum(costs.size_bytes(n, bc[n]["weight_bits"]) for n in names))}
        res.update(dataset=dataset, seed=seed, bits="/".join(str(bc[n]["weight_bits"]) for n in names) if bc else "32",
                   seconds=round(time.perf_counter() - t0, 2))
        results.append(res)
        print(f"  {dataset} seed {seed} {label:<20} bits {res['bits']:<8} size {res['size']:>9.0f} B  "
              f"fake-quant {res['fake_quant']:.4f}  integer {res['integer'] if res['integer'] is None else round(res['integer'], 4)}"
              f"  ({res['seconds']} s)", flush=True)
    traces = ", ".join(f"{r['layer']} {r['trace']:.3g}±{r['trace_stderr']:.2g} (n={r['n_params']})" for r in rows)
    print(f"  {dataset} seed {seed} traces: {traces}", flush=True)
    div = frontier_divergence(rows, costs, args.bits, 8)
    print(f"  {dataset} seed {seed} hawq and reversed allocations differ at {len(div['differ'])} of {div['budgets']} "
          f"size budgets (W2..W8); configurations within 90-100% of a budget: median {div['median_freedom']:.0f}; "
          f"share of weights: " + ", ".join(f"{n} {v:.0%}" for n, v in div["share_of_weights"].items()), flush=True)
    for d in div["differ"][:6]:
        print(f"    at {d['size']:.0f} B: hawq {d['hawq']} vs reversed {d['reversed']}", flush=True)
    for c in second_order_check(job):
        print(f"  {dataset} seed {seed} {c['layer']:<6} W{c['bits']}: measured loss increase {c['measured']:.4g}, "
              f"second-order prediction {c['predicted']:.4g} (ratio {c['measured'] / c['predicted']:.2g})", flush=True)
    return results


def _fmt(values) -> str:
    v = np.array([x for x in values if x is not None], float) * 100
    return "—" if v.size == 0 else f"{v.mean():.2f} ± {v.std():.2f}"


def table(results: list[dict]) -> str:
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rs = [r for r in results if r["dataset"] == dataset]
        seeds = sorted({r["seed"] for r in rs})
        lines += [f"\n{dataset} (seeds {seeds}; accuracy % mean ± std)",
                  f"| configuration | weight bits per layer (seed {seeds[0]}) | size (bytes) | fake-quant | integer-only |",
                  "|---|---|---|---|---|"]
        for label in dict.fromkeys(r["config"] for r in rs):
            g = [r for r in rs if r["config"] == label]
            lines.append(f"| {label} | {g[0]['bits']} | {np.mean([r['size'] for r in g]):.0f} | "
                         f"{_fmt(r['fake_quant'] for r in g)} | {_fmt(r['integer'] for r in g)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--qat-epochs", type=int, default=5)
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--hessian-examples", type=int, default=512)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hqjax_accuracy_table"))
    p.add_argument("--budgets", nargs="+", type=float, default=[4, 3, 2.5],
                   help="size budgets as uniform-equivalent weight bits (2.5: halfway between W2 and W3)")
    p.add_argument("--kinds", nargs="+", default=["hawq", "random", "reversed"],
                   choices=["hawq", "total-trace", "hawq-v2", "random", "reversed"], help="allocations to compare")
    p.add_argument("--skip-uniform", action="store_true", help="only the allocations (e.g. to add a budget)")
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    p.add_argument("--from-json", nargs="+", default=None, help="only print the table of these saved results")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = []
    if args.from_json:
        for path in args.from_json:
            with open(path) as f:
                results += json.load(f)
    else:
        for dataset in args.datasets:
            for seed in args.seeds:
                results += run_seed(dataset, seed, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    summary = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        for label in dict.fromkeys(r["config"].split(" ", 1)[1] for r in results if "@" in r["config"]):
            acc = {k: [r["fake_quant"] for r in results if r["dataset"] == dataset and r["config"] == f"{k} {label}"]
                   for k in ("hawq", "total-trace", "hawq-v2", "random", "reversed")}
            summary.append(f"{dataset} {label}: " + " vs ".join(f"{k} {np.mean(v) * 100:.2f}" for k, v in acc.items() if v))
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    print("key figure (fake-quant accuracy %, mean over seeds): " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
