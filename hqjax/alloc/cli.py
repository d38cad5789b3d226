"""Command line for the allocator: sensitivity table + costs + budgets -> BitConfig JSON.

    python -m hqjax.alloc --table sens.json --costs costs.json --budget size=alpha:0.5 \\
        --bits 2,3,4,8 --metric hawq_v3 --fix conv1=8 --tie a,b --out bits.json

``--import mymetrics`` imports a module first, so metrics it registers with
``hqjax.register_metric`` are usable by name in ``--metric``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from hqjax.alloc.costs import LayerCosts
from hqjax.alloc.sensitivity import SensitivityTable, metric_names
from hqjax.alloc.solve import InfeasibleBudgetError, alpha, allocate

__all__ = ["add_arguments", "main"]


def _budget(text: str):
    kind, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"budget {text!r} must be KIND=VALUE, e.g. size=1.5e6 or bops=alpha:0.5")
    if value.startswith("alpha:"):
        return kind, alpha(float(value[len("alpha:"):]))
    return kind, float(value)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(","))


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--table", help="sensitivity table JSON (SensitivityTable.to_json)")
    ap.add_argument("--costs", help="layer costs JSON (LayerCosts.to_dict as JSON)")
    ap.add_argument("--latency", help="latency table JSON {layer: {bits: us}}")
    ap.add_argument("--budget", action="append", type=_budget, default=[], help="KIND=VALUE or KIND=alpha:X; repeatable")
    ap.add_argument("--bits", type=_ints, default=(2, 3, 4, 8), help="candidate weight bits, e.g. 2,3,4,8")
    ap.add_argument("--act-bits", type=_ints, default=None, help="candidate activation bits (default: follow weights)")
    ap.add_argument("--metric", default="hawq_v3", help="a registered metric name")
    ap.add_argument("--import", dest="imports", action="append", default=[], help="module that registers metrics")
    ap.add_argument("--fix", action="append", default=[], help="LAYER=BITS; repeatable")
    ap.add_argument("--tie", action="append", default=[], help="LAYER,LAYER,...: layers sharing bits; repeatable")
    ap.add_argument("--backend", default="CBC", help="CBC, SCIP, HIGHS or CP-SAT")
    ap.add_argument("--time-limit", type=float, default=None)
    ap.add_argument("--out", help="write the BitConfig here (JSON)")
    ap.add_argument("--list-metrics", action="store_true", help="print registered metric names and exit")
    return ap


def main(argv=None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="python -m hqjax.alloc", description=__doc__.splitlines()[0])).parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    if args.list_metrics:
        print("\n".join(metric_names()))
        return 0
    if not args.table or not args.costs:
        print("error: --table and --costs are required (or --list-metrics)", file=sys.stderr)
        return 2
    table = SensitivityTable.from_json(args.table)
    with open(args.costs) as f:
        costs = LayerCosts.from_dict(json.load(f))
    if args.latency:
        costs = costs.with_latency(args.latency)
    fixed = {k: int(v) for k, v in (s.split("=") for s in args.fix)}
    ties = [t.split(",") for t in args.tie]
    try:
        res = allocate(table, costs, dict(args.budget), args.bits, metric=args.metric, act_candidates=args.act_bits,
                       fixed=fixed, ties=ties, backend=args.backend, time_limit=args.time_limit)
    except InfeasibleBudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, c in res.bit_config.items():
        print(f"{name:<40} W{c['weight_bits']}A{c['act_bits']}")
    costs_text = ", ".join(f"{k} {v:.6g} / {res.limits[k]:.6g}" for k, v in res.costs.items())
    print(f"objective {res.objective:.6g} ({res.metric}); {costs_text}; {res.status} by {res.backend} in {res.solve_time_s:.3f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res.bit_config, f, indent=2)
            f.write("\n")
    return 0
