"""The ``hqjax`` command: the end-to-end job and one sub-command per stage.

``hqjax`` or ``hqjax run`` runs every stage; ``hqjax analyze|allocate|quantize|evaluate``
runs the stages up to that one, skipping those already finished with the same settings
(``hqjax report`` only rebuilds the plots and report from what the folder holds), so after ``hqjax analyze`` a user can change ``--budget`` or ``--metric`` and
``hqjax run`` re-does only allocation and what follows.

Settings are read, lowest precedence first, from the defaults, the ``config.json`` of an
existing output folder (so a folder remembers how it was made), a ``--config`` file (JSON
or TOML) and the flags. Exit codes (the policy of every hqjax command, ``hqjax._errors``):
0 success, 2 bad input (unknown names, impossible bit widths, infeasible budget, missing
data, bad flags) as one line on stderr, 1 an internal failure with its traceback, 130
interrupted (re-run the same command to resume). ``--quiet`` / ``--verbose`` set the level
of the ``hqjax`` logger's messages on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from hqjax._bits import ACT_BITS, WEIGHT_BITS
from hqjax._errors import (EXIT_BUG, ArgumentParser, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER, add_logging_flags,  # noqa: F401
                           configure_logging, run_main)
from hqjax.config import BUDGET_KINDS, STAGES, RunConfig, load_config_file

__all__ = ["main", "build_parser", "resolve_config"]

_COMMANDS = {
    "run": "all stages: train, analyze, allocate, quantize (QAT + integer), evaluate, report",
    "analyze": "train if needed, then per-layer traces (eigenvalues if the metric needs them) and the eigenvalue density",
    "allocate": "bits per layer under the budget (ILP), and the Pareto frontier",
    "quantize": "quantization-aware fine-tuning, calibration and integer-only conversion",
    "evaluate": "accuracy and size of every stage -> metrics.json",
    "report": "rebuild plots, report.md and the summary table from the folder (runs no other stage)",
}


def _default(field: str) -> str:
    value = getattr(RunConfig, field)
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f" (default: {value})"


def _edge_bits(text: str) -> int | None:
    if text.strip().lower() in ("none", "off", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width (e.g. 8) or 'none', got {text!r}") from None


def _add_options(p: argparse.ArgumentParser) -> None:
    # Absent flags stay absent (SUPPRESS), so saved and file settings show through; the
    # defaults shown in --help are RunConfig's.
    S, d = argparse.SUPPRESS, _default
    g = p.add_argument_group("job")
    g.add_argument("--config", default=S, help="JSON or TOML file of settings (flags override it)")
    g.add_argument("--out", "-o", default=S, help="output folder" + d("out"))
    g.add_argument("--model", default=S,
                   help=f"model name, one of {_model_names()}, or your own as package.module:factory" + d("model"))
    g.add_argument("--variables", default=S,
                   help="pretrained variables of the model: an Orbax checkpoint folder or a Flax msgpack file "
                        "(the train stage is then skipped)")
    g.add_argument("--dataset", default=S,
                   help="digits, mnist_subset, an .npz with x_train, y_train, x_test, y_test, "
                        "or a tfds name with --data-dir" + d("dataset"))
    g.add_argument("--data-dir", dest="data_dir", default=S, help="prepared TensorFlow Datasets folder")
    g.add_argument("--seed", type=int, default=S, help="seeds data split, initialization and probes" + d("seed"))
    g.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module first (e.g. one registering sensitivity metrics); repeatable")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=S, help="full-precision training epochs" + d("epochs"))
    g.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="training batch" + d("batch_size"))
    g.add_argument("--learning-rate", dest="learning_rate", type=float, default=S, help=d("learning_rate").strip())
    g = p.add_argument_group("analysis")
    g.add_argument("--curvature", choices=("hessian", "ggn", "fisher", "empirical_fisher"), default=S,
                   help="source of the per-layer traces" + d("curvature"))
    g.add_argument("--probes", dest="num_probes", type=int, default=S,
                   help="at most this many Hutchinson probes per layer" + d("num_probes"))
    g.add_argument("--trace-rtol", dest="trace_rtol", type=float, default=S,
                   help="stop a layer at this relative standard error of its trace" + d("trace_rtol"))
    g.add_argument("--hessian-examples", dest="hessian_examples", type=int, default=S,
                   help="training examples the Hessian is measured on" + d("hessian_examples"))
    g.add_argument("--hessian-batch", dest="hessian_batch", type=int, default=S,
                   help="examples per Hessian batch" + d("hessian_batch"))
    g.add_argument("--top-k", dest="top_k", type=int, default=S, help="top eigenvalues per layer" + d("top_k"))
    g.add_argument("--eig-iters", dest="eig_iters", type=int, default=S,
                   help="power iterations per eigenvalue" + d("eig_iters"))
    g.add_argument("--density-steps", dest="density_steps", type=int, default=S,
                   help="Lanczos steps of the eigenvalue density" + d("density_steps"))
    g = p.add_argument_group("allocation")
    g.add_argument("--metric", default=S, help="registered sensitivity metric" + d("metric"))
    g.add_argument("--budget", default=S, help="fraction of the INT8 cost (0.5, 50%%) or absolute (12k)" + d("budget"))
    g.add_argument("--budget-kind", dest="budget_kind", choices=BUDGET_KINDS, default=S, help=d("budget_kind").strip())
    g.add_argument("--bits", dest="weight_bits", default=S,
                   help=f"candidate weight bits from {','.join(map(str, WEIGHT_BITS))}" + d("weight_bits"))
    g.add_argument("--act-bits", dest="act_bits", type=int, default=S,
                   help=f"activation bits of every layer, one of {','.join(map(str, ACT_BITS))}" + d("act_bits"))
    g.add_argument("--edge-bits", dest="edge_bits", type=_edge_bits, default=S,
                   help="weight bits of the first and last layer, kept out of the allocation; "
                        "'none' allocates them too" + d("edge_bits"))
    g = p.add_argument_group("quantization")
    g.add_argument("--qat-epochs", dest="qat_epochs", type=int, default=S,
                   help="quantization-aware fine-tuning epochs" + d("qat_epochs"))
    g.add_argument("--qat-learning-rate", dest="qat_learning_rate", type=float, default=S,
                   help=d("qat_learning_rate").strip())
    g.add_argument("--calib-examples", dest="calib_examples", type=int, default=S,
                   help="examples that calibrate activation ranges" + d("calib_examples"))
    g.add_argument("--float-islands", dest="float_islands", action="store_true", default=S,
                   help="keep ops with no integer form (softmax, LayerNorm, GELU) in float in the integer-only "
                        "model (default: such a model is refused before training)")
    g = p.add_argument_group("output")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="force progress bars (default: only on a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    add_logging_flags(g)
    g.add_argument("--force", action="append", default=[], choices=STAGES,
                   help="re-run this stage even if up to date (repeatable; default: no stage)")


def _model_names() -> str:
    try:
        from hqjax.models import MODELS
    except ImportError:  # pragma: no cover - models are part of the package
        return "the registered models"
    return ", ".join(sorted(MODELS))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hqjax", description="Hessian-aware mixed-precision quantization: the end-to-end job.",
        epilog="Without a command, 'run' on the embedded default (digits, the small CNN).")
    sub = parser.add_subparsers(dest="command")
    for name, help_ in _COMMANDS.items():
        _add_options(sub.add_parser(name, help=help_, description=help_))
    sub.add_parser("sweep", help="distributed per-layer sweep (see hqjax sweep --help)", add_help=False)
    return parser


_NOT_CONFIG = {"command", "config", "progress", "quiet", "verbose", "force", "imports"}


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
    from hqjax.user_model import import_modules
    from hqjax._workdir import check_writable

    configure_logging(args.quiet, args.verbose)
    if os.getcwd() not in sys.path and "" not in sys.path:  # `--model pkg.mod:factory` from the current folder
        sys.path.insert(0, os.getcwd())
    import_modules(args.imports)
    config = resolve_config(args)
    if args.command != "report":
        check_writable(config.out)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.command == "report":
        job = report_only(config, log=log)
    else:
        until = "report" if args.command == "run" else args.command
        job = run_stages(config, until, log=log, progress=args.progress, force=tuple(args.force))
    if args.command in ("run", "report"):
        from hqjax._report import summary_table

        print(summary_table(job.work.root))
    else:
        print(f"[{args.command}] done; results in {job.work.root}")
    return EXIT_OK


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "sweep":
        try:
            from hqjax.distributed import sweep_main
        except ImportError:
            print("hqjax: error: 'hqjax sweep' needs hqjax.distributed, which is not installed in this build",
                  file=sys.stderr)
            return EXIT_BUG
        return int(sweep_main(argv[1:]) or 0)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    return _run_command(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hqjax`` console script; returns the exit code (see the module
    docstring; the error policy is ``hqjax._errors.run_main``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # before JAX starts (changes nothing when main() runs in a process already using JAX)
    from hqjax.kernels.cpu import reuse_host_memory
    reuse_host_memory(warn=False)
    if argv and argv[0] == "sweep":  # sweep applies the same policy under its own name
        return _main(argv)
    return run_main("hqjax", _main, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
