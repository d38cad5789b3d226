"""The ``hqjax sweep`` command: per-layer curvature jobs over every device of every host.

One invocation per host (``jax.distributed`` process); each runs the jobs of its own devices
and process 0 writes the merged ``results.json``::

    hqjax sweep --out sweep_out --model cnn --metrics top_eigenvalue,trace --subsets 4

    # two hosts (or two local processes): the same command, plus where to meet
    hqjax sweep --out /shared/sweep_out --coordinator host0:12345 --num-processes 2 --process-id 0
    hqjax sweep --out /shared/sweep_out --coordinator host0:12345 --num-processes 2 --process-id 1

Re-running the same command after an interruption resumes it. Also runnable as
``python -m hqjax.distributed.command``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from hqjax._errors import (ArgumentParser, DefaultsHelpFormatter, UserError, add_logging_flags, configure_logging,
                           run_main)

__all__ = ["METRICS", "build_parser", "sweep_problem", "sweep_main"]


# Metric functions: (matvec restricted to the layer, params, key, options) -> JSON-able dict.
def _top_eigenvalue(matvec, params, key, opts) -> dict:
    """HAWQ-V1 (Dong et al. 2019, Sec. 3.1) / Q-BERT: top eigenvalue of the layer's Hessian block."""
    import hqjax

    res = hqjax.top_eigenvalues(matvec, params, key, k=1, method=opts["eigen_method"],
                                max_iters=opts["max_iters"], tol=opts["tol"], loop=opts["loop"])
    return {"eigenvalue": float(res.eigenvalues[0]), "num_iters": int(res.num_iters[0])}


def _trace(matvec, params, key, opts) -> dict:
    """HAWQ-V2 (Dong et al. 2020, Eq. 4): Hutchinson trace of the layer's Hessian block."""
    import hqjax

    res = hqjax.trace(matvec, params, key, num_probes=opts["num_probes"], loop=opts["loop"])
    return {"trace": float(res.total), "stderr": float(res.total_stderr), "num_probes": int(res.num_probes)}


def _density(matvec, params, key, opts) -> dict:
    """PyHessian (Yao et al. 2020, Alg. 3): SLQ nodes and weights of the layer's Hessian block."""
    import hqjax

    res = hqjax.spectral_density(matvec, params, key, num_steps=opts["num_steps"], num_runs=1, loop=opts["loop"])
    return {"nodes": [float(x) for x in res.nodes[0]], "weights": [float(x) for x in res.weights[0]]}


METRICS: dict[str, Callable[..., dict]] = {"top_eigenvalue": _top_eigenvalue, "trace": _trace, "density": _density}


_DESCRIPTION = """Per-layer curvature jobs over every device of every host (one invocation per host;
process 0 writes the merged results.json). Re-running the same command resumes it.

  hqjax sweep --out sweep_out --model cnn --metrics top_eigenvalue,trace --subsets 4"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="hqjax sweep", description=_DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (shared by all hosts); resumes if it exists")
    p.add_argument("--model", default="cnn", help="hqjax.models name, or your own (Linen or NNX) as "
                   "package.module:factory, as in hqjax run")
    p.add_argument("--dataset", default="digits", help="'digits', 'mnist_subset', an .npz with x_train, y_train, "
                   "x_test, y_test, or a tfds name with --data-dir")
    p.add_argument("--data-dir", default=None, help="prepared TensorFlow Datasets folder")
    p.add_argument("--variables", "--params", dest="params", default=None,
                   help="the model's variables: an Orbax checkpoint folder or a Flax msgpack file (none: the model "
                        "initialized from --seed)")
    p.add_argument("--metrics", default="top_eigenvalue,trace", help=f"comma-separated, from {sorted(METRICS)}")
    p.add_argument("--layers", default=None, help="comma-separated block names (none: every layer)")
    p.add_argument("--subsets", type=int, default=1, help="disjoint data subsets (Q-BERT's spread over data)")
    p.add_argument("--subset-size", type=int, default=128, help="examples per subset")
    p.add_argument("--num-probes", type=int, default=32, help="Hutchinson probes per trace")
    p.add_argument("--max-iters", type=int, default=100, help="power iterations per eigenvalue")
    p.add_argument("--tol", type=float, default=1e-3, help="power iteration relative tolerance")
    p.add_argument("--eigen-method", default="power", choices=("power", "lanczos"), help="eigenvalue estimator")
    p.add_argument("--num-steps", type=int, default=30, help="Lanczos steps per density")
    p.add_argument("--loop", default="auto", choices=("auto", "host", "device"),
                   help="where estimator loops run (see hqjax.trace); 'device' compiles faster for dense models")
    p.add_argument("--seed", type=int, default=0, help="seeds initialization, probes and start vectors")
    p.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache directory: a resumed "
                   "sweep, other processes and other data subsets reuse compiled estimators from it")
    add_logging_flags(p)
    g = p.add_argument_group("multi-process (one process per host; see README)")
    g.add_argument("--coordinator", default=None, help="process 0's host:port")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--auto-cluster", action="store_true",
                   help="jax.distributed.initialize() with cluster auto-detection (Cloud TPU, SLURM, MPI)")
    return p


_RUN_ONLY = ("out", "coordinator", "num_processes", "process_id", "auto_cluster", "compile_cache", "quiet", "verbose")


def _check_msgpack(path: str) -> None:
    """A readable msgpack file (whether it fits the model is known only after initialization)."""
    from flax import serialization

    if not os.path.exists(path):
        raise UserError(f"--variables {path!r} does not exist; pass an Orbax checkpoint folder or a "
                        f"flax.serialization msgpack file")
    if os.path.isdir(path):  # an Orbax checkpoint: read after JAX starts (restoring may touch devices)
        return
    try:
        with open(path, "rb") as f:
            serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - msgpack raises many types for a file that is not msgpack
        raise UserError(f"--variables {path!r} does not hold model variables: it is not a flax.serialization msgpack "
                        f"file ({type(e).__name__})") from None


def check_args(args: argparse.Namespace) -> list[str]:
    """Every setting checked before JAX starts or data loads; returns the metric names.

    Raises
    ------
    UserError : naming the bad setting and what would work.
    """
    from hqjax._job import check_names
    from hqjax._workdir import check_writable

    metrics = [m for m in args.metrics.split(",") if m]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"unknown metric(s) {unknown or args.metrics!r}; choose from {sorted(METRICS)}, "
                        f"e.g. --metrics top_eigenvalue,trace")
    for flag, value in (("--subsets", args.subsets), ("--subset-size", args.subset_size),
                        ("--num-probes", args.num_probes), ("--max-iters", args.max_iters),
                        ("--num-steps", args.num_steps)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if not args.tol > 0:
        raise UserError(f"--tol must be positive, e.g. 1e-3; got {args.tol}")
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    check_names(_run_config(args))
    if args.params:
        _check_msgpack(args.params)
    check_writable(args.out)
    return metrics


def _run_config(args: argparse.Namespace):
    """The model, data and variables settings in ``hqjax run``'s terms: the sweep resolves and
    checks them as the job does (names, factories, .npz files, Orbax or msgpack variables)."""
    from hqjax.config import RunConfig

    return RunConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, variables=args.params,
                     seed=args.seed, out=args.out)


def sweep_problem(args: argparse.Namespace):
    """The sweep's jobs and ``compute(job, device)`` from parsed arguments.

    Subset ``s`` is training examples ``[s * subset_size, (s + 1) * subset_size)``; the loss is
    the mean softmax cross-entropy of the model in eval mode (BatchNorm statistics fixed).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import hqjax
    from hqjax._job import Job
    from hqjax.distributed.sweep import job_key, make_jobs
    from hqjax.train import init_variables

    metrics = check_args(args)
    job = Job(_run_config(args), log=lambda line: None)
    data = job.dataset
    need = args.subsets * args.subset_size
    if need > len(data.x_train):
        raise UserError(f"{args.subsets} subsets of {args.subset_size} need {need} examples but {args.dataset!r} "
                         f"has {len(data.x_train)} training examples; lower --subsets or --subset-size")
    job.check_inputs()  # the model takes the data, the variables fit it
    model = job.model
    init = lambda: init_variables(model, jax.random.key(args.seed), data.input_shape, data.input_dtype)  # noqa: E731
    names = hqjax.blocks(jax.eval_shape(init)["params"], stacked=job.stacked).names  # before any compute
    unknown = [name for name in (args.layers.split(",") if args.layers else []) if name not in names]
    if unknown:
        raise UserError(f"--layers names {unknown}, not layers of {args.model!r}; its layers are {list(names)}")
    variables = job.pretrained
    variables = jax.tree.map(np.asarray, init() if variables is None else variables)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    blk = hqjax.blocks(params, stacked=job.stacked)
    layers = list(blk.names) if not args.layers else args.layers.split(",")
    jobs = make_jobs(layers, metrics, args.subsets)
    opts = {k: getattr(args, k) for k in ("num_probes", "max_iters", "tol", "eigen_method", "num_steps", "loop")}
    base_key = jax.random.key(args.seed)

    def loss(p, x, y, st):
        logits = model.apply({"params": p, **st}, x, train=False)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def compute(job, device) -> Mapping[str, Any]:
        lo = job.subset * args.subset_size
        x, y, p, st = jax.device_put((data.x_train[lo:lo + args.subset_size],
                                      data.y_train[lo:lo + args.subset_size], params, state), device)
        matvec = blk.restrict_operator(hqjax.hessian(lambda q: loss(q, x, y, st), p), job.layer)
        return METRICS[job.metric](matvec, p, job_key(base_key, job), opts)

    config = {k: v for k, v in vars(args).items() if k not in _RUN_ONLY}
    return jobs, compute, config


def _check_resume(out: str, config: Mapping[str, Any]) -> None:
    """A resumed sweep must have the settings of the first run (checked before any job)."""
    import json

    from hqjax._schema import read_json

    path = os.path.join(out, "config.json")
    if os.path.isfile(path):
        old = read_json(path, "sweep_config")
        new = json.loads(json.dumps(dict(config)))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(f"{out!r} holds a sweep with other settings (they differ in {diff}); resume with the "
                            f"same settings or choose a new --out")


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hqjax sweep`` (``argv`` without the program name); returns the exit code
    (the error policy of ``hqjax._errors``)."""
    return run_main("hqjax sweep", _sweep, sys.argv[1:] if argv is None else list(argv))


def _sweep(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    check_args(args)  # before jax.distributed starts and the data loads
    from hqjax.distributed.sweep import initialize, run_sweep

    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.auto_cluster)
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jobs, compute, config = sweep_problem(args)
    _check_resume(args.out, config)
    me = jax.process_index()
    log = lambda line: print(f"[process {me}] {line}", flush=True)
    log(f"{len(jobs)} jobs over {jax.device_count()} devices in {jax.process_count()} process(es)")
    report = run_sweep(jobs, compute, args.out, config=config, log=log)
    log(f"done: computed {len(report.computed)}, already finished {len(report.skipped)}; results in {report.results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(sweep_main())
