"""Command line for the allocator: sensitivity table + costs + budgets -> BitConfig JSON.

    python -m hqjax.alloc --table sens.json --costs costs.json --budget size=alpha:0.5 \
        --bits 2,3,4,8 --metric hawq_v3 --fix conv1=8 --tie a,b --out bits.json

The table is the versioned sensitivity schema (hqjax._schema), so the sensitivity.json of
``hqjax run`` / ``hqjax analyze`` is read as it is. ``--import mymetrics`` imports a module
first, so metrics it registers with ``hqjax.register_metric`` are usable in ``--metric``.
Activations are 8-bit unless ``--act-bits`` says otherwise (``--act-bits weights``: they
follow the weight bits), as in ``hqjax.allocate`` and ``hqjax run``. Errors follow
hqjax._errors: bad input is one line and exit code 2, checked before the solver runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hqjax._bits import ACT_BITS, DEFAULT_ACT_BITS, WEIGHT_BITS, bad_act_bits, bad_weight_bits
from hqjax._errors import (ArgumentParser, DefaultsHelpFormatter, UserError, add_logging_flags, configure_logging,
                           one_line, run_main)
from hqjax._schema import read_json
from hqjax.alloc._backends import BACKENDS
from hqjax.alloc.costs import LayerCosts
from hqjax.alloc.sensitivity import SensitivityTable, metric_names, sensitivity_scores
from hqjax.alloc.solve import FOLLOW_WEIGHTS, InfeasibleBudgetError, alpha, allocate

__all__ = ["add_arguments", "main"]

_KINDS = ("size", "bops", "latency")


def _budget(text: str):
    kind, _, value = text.partition("=")
    usage = "use KIND=VALUE or KIND=alpha:X with KIND one of size, bops, latency, e.g. size=1.5e6 or bops=alpha:0.5"
    if kind not in _KINDS or not value:
        raise argparse.ArgumentTypeError(f"budget {text!r}: {usage}")
    try:
        if value.startswith("alpha:"):
            return kind, alpha(float(value[len("alpha:"):]))
        limit = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"budget {text!r}: {e}") from None
    if not limit > 0:
        raise argparse.ArgumentTypeError(f"budget {text!r}: the limit must be positive")
    return kind, limit


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 2,3,4,8") from None


def _weight_bits(text: str) -> tuple[int, ...]:
    bits = _ints(text)
    if bad_weight_bits(bits):
        raise argparse.ArgumentTypeError(f"weight bits {bad_weight_bits(bits)} cannot be quantized; "
                                         f"choose from {list(WEIGHT_BITS)}")
    return bits


def _act_bits(text: str):
    if text == FOLLOW_WEIGHTS:
        return FOLLOW_WEIGHTS
    bits = _ints(text)
    if bad_act_bits(bits):
        raise argparse.ArgumentTypeError(f"activation bits {bad_act_bits(bits)} cannot be quantized; choose from "
                                         f"{list(ACT_BITS)} or '{FOLLOW_WEIGHTS}'")
    return bits


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--table", help="sensitivity table JSON (sensitivity.json of hqjax analyze, or "
                    "SensitivityTable.to_json)")
    ap.add_argument("--costs", help="layer costs JSON (LayerCosts.to_dict as JSON)")
    ap.add_argument("--latency", help="latency table JSON {layer: {bits: us}}")
    ap.add_argument("--budget", action="append", type=_budget, default=[],
                    help="KIND=VALUE or KIND=alpha:X (KIND: size, bops, latency); repeatable; none: all-highest bits")
    ap.add_argument("--bits", type=_weight_bits, default=(2, 3, 4, 8), help="candidate weight bits")
    ap.add_argument("--act-bits", type=_act_bits, default=(DEFAULT_ACT_BITS,),
                    help=f"candidate activation bits, or '{FOLLOW_WEIGHTS}' to follow the weight bits")
    ap.add_argument("--metric", default="hawq_v3", help="a registered metric name (see --list-metrics)")
    ap.add_argument("--import", dest="imports", action="append", default=[], help="module that registers metrics")
    ap.add_argument("--fix", action="append", default=[], help="LAYER=BITS; repeatable")
    ap.add_argument("--tie", action="append", default=[], help="LAYER,LAYER,...: layers sharing bits; repeatable")
    ap.add_argument("--backend", default="CBC", help=f"OR-Tools backend, one of {', '.join(BACKENDS)}")
    ap.add_argument("--time-limit", type=float, default=None, help="solver seconds (none: until proven optimal)")
    ap.add_argument("--out", help="write the BitConfig here (JSON)")
    ap.add_argument("--list-metrics", action="store_true", help="print registered metric names and exit")
    add_logging_flags(ap)
    return ap


def _read(path: str, what: str, build, kind: str | None = None):
    """``build(document)`` of the JSON file at ``path`` (a ``kind`` document, if given);
    any failure names the file."""
    doc = read_json(path, kind)
    try:
        return build(doc)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{path!r} is not a valid {what}: {one_line(e)}") from None


def _check(args, table: SensitivityTable, costs: LayerCosts) -> tuple[dict, list]:
    """Every name and setting checked against the inputs before the solver runs."""
    if len(table) == 0:
        raise UserError(f"the sensitivity table {args.table!r} has no layers; run the analysis "
                        f"(hqjax analyze) to fill it")
    if args.metric not in metric_names():
        raise UserError(f"unknown metric {args.metric!r}; registered metrics: {', '.join(metric_names())} "
                        f"(--import a module that registers others)")
    if args.backend.upper() not in BACKENDS:
        raise UserError(f"unknown backend {args.backend!r}; choose one of {', '.join(BACKENDS)}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit must be positive seconds, got {args.time_limit}")
    missing = [n for n in table.names if n not in costs.names]
    if missing:
        raise UserError(f"layers {missing} of {args.table!r} have no costs in {args.costs!r}; "
                        f"use the costs of the same model")
    try:  # scoring is cheap; it finds missing bits or fields the metric needs before the solver runs
        sensitivity_scores(table, args.bits, args.metric)
    except (KeyError, ValueError) as e:
        raise UserError(f"{args.table!r} cannot be scored by {args.metric!r} for bits {list(args.bits)}: "
                        f"{one_line(e.args[0] if e.args else e)}") from None
    kinds = [k for k, _ in args.budget]
    if "latency" in kinds and not (args.latency or costs.latency_us):
        raise UserError("a latency budget needs a latency table: pass --latency FILE")
    known = list(costs.names)
    fixed = {}
    for spec in args.fix:
        layer, _, bits = spec.partition("=")
        try:
            bits = int(bits)
        except ValueError:
            raise UserError(f"--fix {spec!r}: use LAYER=BITS, e.g. --fix conv1=8") from None
        if layer not in known:
            raise UserError(f"--fix {spec!r}: no layer {layer!r}; layers are {known}")
        if bad_weight_bits([bits]):
            raise UserError(f"--fix {spec!r}: {bits} bits cannot be quantized; choose from {list(WEIGHT_BITS)}")
        fixed[layer] = bits
    ties = [t.split(",") for t in args.tie]
    for tie in ties:
        unknown = [n for n in tie if n not in known]
        if unknown or len(tie) < 2:
            raise UserError(f"--tie {','.join(tie)!r}: " + (f"no layers {unknown}; layers are {known}" if unknown
                                                              else "name at least two layers, e.g. --tie a,b"))
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"cannot write --out {args.out!r}: {folder!r} is not a writable folder")
    return fixed, ties


def _main(argv) -> int:
    parser = ArgumentParser(prog="python -m hqjax.alloc", formatter_class=DefaultsHelpFormatter,
                            description="Bit allocation (HAWQ-V3 ILP): sensitivity table + layer costs + budgets "
                                        "-> BitConfig JSON.")
    args = add_arguments(parser).parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"--import {module!r} failed ({e}); check the module name and that its folder is "
                            f"on PYTHONPATH") from None
    if args.list_metrics:
        print("\n".join(metric_names()))
        return 0
    if not args.table or not args.costs:
        raise UserError("--table and --costs are required (or --list-metrics)")
    table = _read(args.table, "sensitivity table", SensitivityTable.from_dict, "sensitivity")
    costs = _read(args.costs, "costs table", LayerCosts.from_dict)
    if args.latency:
        costs = _read(args.latency, "latency table", costs.with_latency)
    fixed, ties = _check(args, table, costs)
    try:
        res = allocate(table, costs, dict(args.budget), args.bits, metric=args.metric, act_candidates=args.act_bits,
                       fixed=fixed, ties=ties, backend=args.backend, time_limit=args.time_limit)
    except InfeasibleBudgetError as e:
        raise UserError(one_line(e)) from None
    except TimeoutError as e:
        raise UserError(f"{e}: raise --time-limit") from None
    for name, c in res.bit_config.items():
        print(f"{name:<40} W{c['weight_bits']}A{c['act_bits']}")
    costs_text = ", ".join(f"{k} {v:.6g} / {res.limits[k]:.6g}" for k, v in res.costs.items())
    print(f"objective {res.objective:.6g} ({res.metric}); {costs_text}; {res.status} by {res.backend} in {res.solve_time_s:.3f} s")
    if args.out:
        from hqjax.quant.bitconfig import save_bit_config

        save_bit_config(res.bit_config, args.out)
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m hqjax.alloc``; returns the exit code (hqjax._errors policy)."""
    return run_main("python -m hqjax.alloc", _main, sys.argv[1:] if argv is None else list(argv))
