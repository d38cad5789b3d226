"""The ``hqjax`` command: the end-to-end job and one sub-command per stage.

``hqjax`` or ``hqjax run`` runs every stage; ``hqjax analyze|allocate|quantize|evaluate``
runs the stages up to that one, skipping those already finished with the same settings
(``hqjax report`` only rebuilds the plots and report from what the folder holds), so after ``hqjax analyze`` a user can change ``--budget`` or ``--metric`` and
``hqjax run`` re-does only allocation and what follows.

Settings are read, lowest precedence first, from the defaults, the ``config.json`` of an
existing output folder (so a folder remembers how it was made), a ``--config`` file (JSON
or TOML) and the flags. Exit codes: 0 success, 2 bad input (unknown names, infeasible
budget, missing data; argparse's own code for bad flags), 1 an internal failure, 130
interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from hqjax.config import STAGES, RunConfig, UserError, load_config_file

__all__ = ["main", "build_parser", "resolve_config"]

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130

_COMMANDS = {
    "run": "all stages: train, analyze, allocate, quantize (QAT + integer), evaluate, report",
    "analyze": "train if needed, then per-layer traces (eigenvalues if the metric needs them) and the eigenvalue density",
    "allocate": "bits per layer under the budget (ILP), and the Pareto frontier",
    "quantize": "quantization-aware fine-tuning, calibration and integer-only conversion",
    "evaluate": "accuracy and size of every stage -> metrics.json",
    "report": "rebuild plots, report.md and the summary table from the folder (runs no other stage)",
}


def _add_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # absent flags stay absent, so saved and file settings show through
    g = p.add_argument_group("job")
    g.add_argument("--config", default=S, help="JSON or TOML file of settings (flags override it)")
    g.add_argument("--out", "-o", default=S, help="output folder (default hqjax_out)")
    g.add_argument("--model", default=S, help="model name (cnn, mlp, resnet20, ...)")
    g.add_argument("--dataset", default=S, help="digits, mnist_subset, or a tfds name with --data-dir")
    g.add_argument("--data-dir", dest="data_dir", default=S, help="prepared TensorFlow Datasets folder")
    g.add_argument("--seed", type=int, default=S)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=S)
    g.add_argument("--batch-size", dest="batch_size", type=int, default=S)
    g.add_argument("--learning-rate", dest="learning_rate", type=float, default=S)
    g = p.add_argument_group("analysis")
    g.add_argument("--curvature", choices=("hessian", "ggn", "fisher", "empirical_fisher"), default=S,
                   help="source of the per-layer traces (default hessian)")
    g.add_argument("--probes", dest="num_probes", type=int, default=S, help="at most this many Hutchinson probes per layer")
    g.add_argument("--trace-rtol", dest="trace_rtol", type=float, default=S,
                   help="stop a layer at this relative standard error of its trace (default 0.05)")
    g.add_argument("--hessian-examples", dest="hessian_examples", type=int, default=S)
    g.add_argument("--hessian-batch", dest="hessian_batch", type=int, default=S)
    g.add_argument("--top-k", dest="top_k", type=int, default=S, help="top eigenvalues per layer")
    g.add_argument("--eig-iters", dest="eig_iters", type=int, default=S)
    g.add_argument("--density-steps", dest="density_steps", type=int, default=S)
    g = p.add_argument_group("allocation")
    g.add_argument("--metric", default=S, help="registered sensitivity metric (e.g. hawq_v3)")
    g.add_argument("--budget", default=S, help="fraction of the INT8 cost (0.5, 50%%) or absolute (12k)")
    g.add_argument("--budget-kind", dest="budget_kind", choices=("size", "bops", "latency"), default=S)
    g.add_argument("--bits", dest="weight_bits", default=S, help="candidate weight bits, e.g. 2,3,4,8")
    g.add_argument("--act-bits", dest="act_bits", type=int, default=S)
    g = p.add_argument_group("quantization")
    g.add_argument("--qat-epochs", dest="qat_epochs", type=int, default=S)
    g.add_argument("--qat-learning-rate", dest="qat_learning_rate", type=float, default=S)
    g.add_argument("--calib-examples", dest="calib_examples", type=int, default=S)
    g = p.add_argument_group("output")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="force progress bars (default: only on a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--quiet", "-q", action="store_true", help="print only the summary and errors")
    g.add_argument("--force", action="append", default=[], choices=STAGES, help="re-run this stage even if up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hqjax", description="Hessian-aware mixed-precision quantization: the end-to-end job.",
        epilog="Without a command, 'run' on the embedded default (digits, the small CNN).")
    sub = parser.add_subparsers(dest="command")
    for name, help_ in _COMMANDS.items():
        _add_options(sub.add_parser(name, help=help_, description=help_))
    sub.add_parser("sweep", help="distributed per-layer sweep (see hqjax sweep --help)", add_help=False)
    return parser


_NOT_CONFIG = {"command", "config", "progress", "quiet", "force"}


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Defaults < the output folder's saved ``config.json`` < ``--config`` file < flags."""
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    from_file = load_config_file(args.config) if getattr(args, "config", None) else {}
    out = flags.get("out", from_file.get("out", RunConfig.out))
    saved_path = os.path.join(out, "config.json")
    saved = load_config_file(saved_path) if os.path.isfile(saved_path) else {}
    merged = {**saved, **from_file, **flags, "out": out}
    return RunConfig.from_dict(merged)


def _run_command(args: argparse.Namespace) -> int:
    from hqjax.pipeline import report_only, run_stages

    config = resolve_config(args)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.command == "report":
        job = report_only(config, log=log)
    else:
        until = "report" if args.command == "run" else args.command
        job = run_stages(config, until, log=log, progress=args.progress, force=tuple(args.force))
    if args.command in ("run", "report"):
        from hqjax.report import summary_table

        print(summary_table(job.work.root))
    else:
        print(f"[{args.command}] done; results in {job.work.root}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hqjax`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # before JAX starts (changes nothing when main() runs in a process already using JAX)
    from hqjax.host import reuse_host_memory
    reuse_host_memory(warn=False)
    if argv and argv[0] == "sweep":
        try:
            from hqjax.distributed import sweep_main
        except ImportError:
            print("hqjax: error: 'hqjax sweep' needs hqjax.distributed, which is not installed in this build",
                  file=sys.stderr)
            return EXIT_INTERNAL
        return int(sweep_main(argv[1:]) or 0)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    try:
        return _run_command(args)
    except UserError as e:
        print(f"hqjax: error: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("\nhqjax: interrupted; run the same command again to resume from the last finished step",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - the boundary: anything else is our bug, reported as such
        traceback.print_exc()
        print("hqjax: internal error (exit code 1): the traceback above is a bug in hqjax or its "
              "dependencies, not in your input", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
