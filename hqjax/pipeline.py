"""The end-to-end job: train, analyze, allocate, quantize, evaluate, report.

Each stage is a function of a :class:`Job` (``hqjax._job``: the configuration, the output
folder and lazily loaded, checked inputs) that reads what earlier stages wrote to the output
folder and writes its own files there atomically; :func:`run_stages` runs the stages up to a target, skipping those
whose marker carries the current fingerprint (see ``hqjax.config.stage_fingerprints``). The
analysis (``hqjax._analyze``) is resumable per layer.

The numerical work is the public API of the other areas: ``hqjax.curvature`` (HAWQ-V2
Hutchinson traces, HAWQ-V1 top eigenvalues, PyHessian's SLQ density), ``hqjax.quant``
(weight perturbation per bit, fake quantization, QAT, integer-only conversion) and
``hqjax.alloc`` (costs, sensitivity metrics, the ILP of HAWQ-V3 Sec. 3.4).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from hqjax._analyze import stage_analyze
from hqjax._job import Job, check_names
from hqjax.config import STAGES, RunConfig, UserError
from hqjax.train import accuracy, load_variables, progress_bar, save_variables, train_cached

__all__ = ["Job", "run", "run_stages", "report_only", "check_names", "STAGE_FUNCTIONS", "quantize_finetune",
           "make_quantize_finetune", "Finetuned", "integer_accuracy",
           "sensitivity_from_rows", "layer_costs", "uniform_cost", "resolve_budget"]


# ----------------------------------------------------------------------------- train
def stage_train(job: Job) -> None:
    """Train the full-precision model (or load it from the cache) and record its accuracy.

    Given pretrained variables (``--variables``, ``hqjax.run(model, variables, ...)``, an NNX
    model's own weights), nothing is trained: HAWQ starts from a trained model, and this
    stage only records them and their accuracy.
    """
    from hqjax.train import train

    d, c = job.dataset, job.config
    t0 = time.perf_counter()
    cached, pretrained = False, job.pretrained is not None
    if pretrained:
        variables = job.pretrained
    elif job.user_model:  # no registry name to key a cache by: the model object may change under it
        variables = train(job.model, d.x_train, d.y_train, job.train_config, progress=job.progress)
    else:
        variables, cached = train_cached(job.model, c.model, d, job.train_config, progress=job.progress)
    save_variables(job.work.path("fp_model.msgpack"), variables)
    job.__dict__.pop("variables", None)
    job.__dict__.pop("blocks", None)
    acc = accuracy(job.model.apply, variables, d.x_test, d.y_test)
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))
    job.work.write_json("train.json", {"test_accuracy": acc, "n_params": n_params, "from_cache": cached,
                                       "pretrained": pretrained,
                                       "seconds": round(time.perf_counter() - t0, 3),
                                       "n_train": int(len(d.x_train)), "n_test": int(len(d.x_test))})
    how = " (pretrained, not trained)" if pretrained else " (loaded from cache)" if cached else ""
    job.log(f"[train] {c.model} on {d.name}: test accuracy {acc:.4f}, {n_params} parameters{how}")


# ----------------------------------------------------------------------------- allocate
def sensitivity_from_rows(rows: list[dict]):
    """The ``hqjax.SensitivityTable`` of ``sensitivity.json``'s layer rows."""
    from hqjax.alloc import LayerSensitivity, SensitivityTable

    return SensitivityTable({r["layer"]: LayerSensitivity(
        n_params=r["n_params"], perturbation={int(b): v for b, v in r["perturbation"].items()},
        trace=r["trace"], trace_stderr=r["trace_stderr"], eigenvalues=tuple(r["top_eigenvalues"]),
        weight_norm_sq=r.get("weight_norm_sq")) for r in rows})


def layer_costs(job: Job, variables=None):
    """``hqjax.LayerCosts`` of the model (shapes traced at batch 1), with a latency table when
    needed. ``variables`` may be shapes only (``jax.eval_shape``); default the trained ones."""
    from hqjax.alloc import LayerCosts, layer_shapes, measure_latency_table

    x = jax.ShapeDtypeStruct((1, *job.dataset.input_shape), job.dataset.input_dtype)
    shapes = layer_shapes(job.model, job.variables if variables is None else variables, x, train=False)
    costs = LayerCosts.from_shapes(shapes)
    if job.config.budget_kind == "latency":
        if not job.work.exists("latency_table.json"):
            job.work.write_json("latency_table.json", measure_latency_table(shapes, job.config.weight_bits))
        costs = costs.with_latency(job.work.read_json("latency_table.json"))
    return costs


def uniform_cost(costs, kind: str, names, weight_bits: int, act_bits: int) -> float:
    """Cost of the model with every layer at ``weight_bits`` / ``act_bits``."""
    return float(sum(costs.cost(kind, n, weight_bits, act_bits) for n in names))


def edge_layers(config: RunConfig, names) -> dict[str, tuple[int, int]]:
    """``{layer: (w, a)}`` for the first and last layer (call order) when ``edge_bits`` pins them."""
    if config.edge_bits is None or not names:
        return {}
    return {n: (config.edge_bits, config.act_bits) for n in (names[0], names[-1])}


def resolve_budget(config: RunConfig, costs, names) -> float:
    """The absolute budget: a fraction of the INT8 cost of the allocated layers plus the pinned
    layers at their pinned cost, or the absolute value given."""
    from hqjax.config import parse_budget

    form, value = parse_budget(config.budget)
    if form == "fraction":
        pinned = edge_layers(config, names)
        free = [n for n in names if n not in pinned]
        return (value * uniform_cost(costs, config.budget_kind, free, 8, config.act_bits)
                + sum(costs.cost(config.budget_kind, n, *wa) for n, wa in pinned.items()))
    return value


_UNITS = {"size": "bytes", "bops": "BOPs", "latency": "µs"}


def _allocate(table, costs, config: RunConfig, limit: float):
    from hqjax.alloc import InfeasibleBudgetError, allocate

    kind = config.budget_kind
    try:
        return allocate(table, costs, {kind: limit}, candidates=config.weight_bits, metric=config.metric,
                        act_candidates=(config.act_bits,), fixed=edge_layers(config, costs.names))
    except InfeasibleBudgetError as e:
        int8 = uniform_cost(costs, kind, costs.names, 8, config.act_bits)
        smallest = e.minimal[kind]
        raise UserError(
            f"{kind} budget {config.budget!r} = {limit:.6g} {_UNITS[kind]} is infeasible with candidate bits "
            f"{list(config.weight_bits)}: the smallest feasible {kind} budget is {smallest:.6g} {_UNITS[kind]} "
            f"(--budget {smallest:.6g}, or {smallest / int8:.4f} of the INT8 model)"
            + (f"; the first and last layer are pinned at {config.edge_bits} bits (--edge-bits none allocates them too)"
               if config.edge_bits is not None else "")) from None


def check_budget(job: Job) -> None:
    """Fail before any training when no bit assignment fits the budget.

    Feasibility depends only on layer shapes and candidate bits, so it is decided from the
    untrained model's shapes (nothing computed) by the allocator itself with zero scores.
    A latency budget needs the measured table and is checked at allocation.
    """
    from hqjax.train import init_variables

    c = job.config
    if c.budget_kind == "latency":
        return
    shapes = jax.eval_shape(lambda: init_variables(job.model, jax.random.PRNGKey(0), job.dataset.input_shape,
                                                   job.dataset.input_dtype))
    costs = layer_costs(job, shapes)
    zero = {n: {b: 0.0 for b in c.weight_bits} for n in costs.names}
    _allocate(zero, costs, c, resolve_budget(c, costs, costs.names))


def pareto_points(table, costs, config: RunConfig, num: int = 24) -> list[dict]:
    """The cost/sensitivity frontier: the optimal allocation at ``num`` budgets between the
    cheapest and the dearest configuration (HAWQ-V2 Sec. 3.3's Pareto frontier)."""
    kind, pinned = config.budget_kind, edge_layers(config, costs.names)
    free = [n for n in table.names if n not in pinned]
    fixed = sum(costs.cost(kind, n, *wa) for n, wa in pinned.items())
    lo = fixed + uniform_cost(costs, kind, free, min(config.weight_bits), config.act_bits)
    hi = fixed + uniform_cost(costs, kind, free, max(config.weight_bits), config.act_bits)
    points, seen = [], set()
    for limit in np.linspace(lo, hi, num):
        a = _allocate(table, costs, config, float(limit) * (1 + 1e-12))
        key = tuple(sorted(a.weight_bits.items()))
        if key not in seen:
            seen.add(key)
            points.append({"cost": a.costs[kind], "sensitivity": a.objective, "bits": a.weight_bits})
    return sorted(points, key=lambda p: p["cost"])


def stage_allocate(job: Job) -> None:
    """Bits per layer of least summed sensitivity within the budget (HAWQ-V3 Eq. 12)."""
    from hqjax.alloc import sensitivity_scores
    from hqjax.tree import stack_layer

    c, work = job.config, job.work
    rows = work.read_json("sensitivity.json")["layers"]
    table = sensitivity_from_rows(rows)
    costs = layer_costs(job)
    limit = resolve_budget(c, costs, costs.names)
    alloc = _allocate(table, costs, c, limit)
    scores = sensitivity_scores(table, c.weight_bits, c.metric)
    uniform = [{"bits": b, "cost": uniform_cost(costs, c.budget_kind, table.names, b, c.act_bits),
                "sensitivity": float(sum(scores[n][b] for n in table.names))} for b in c.weight_bits]
    bit_config = alloc.bit_config
    if job.stacked:  # only the weights of a stack's layers are quantized (hqjax.quantize_model refuses act bits)
        stacked = [n for n in bit_config if stack_layer(n)[1] is not None]
        bit_config = {n: {**e, "act_bits": None} if n in stacked else e for n, e in bit_config.items()}
        job.log(f"[allocate] {len(stacked)} layers of stacked modules ({', '.join(job.stacked)}) are weight-only: "
                f"act_bits None in bit_config.json" + (f" (the {c.budget_kind} budget counts their inputs at "
                                                        f"{c.act_bits} bits)" if c.budget_kind != "size" else ""))
    work.write_json("bit_config.json", bit_config)
    work.write_json("allocation.json", {**alloc.to_dict(), "budget_kind": c.budget_kind, "budget": limit,
                                        "unit": _UNITS[c.budget_kind], "costs_table": costs.to_dict()})
    work.write_json("pareto.json", {"kind": c.budget_kind, "unit": _UNITS[c.budget_kind], "metric": c.metric,
                                    "budget": limit, "points": pareto_points(table, costs, c), "uniform": uniform,
                                    "chosen": {"cost": alloc.costs[c.budget_kind], "sensitivity": alloc.objective,
                                               "bits": alloc.weight_bits}})
    job.log(f"[allocate] {c.metric}, {c.budget_kind} budget {limit:.6g} {_UNITS[c.budget_kind]}: "
            + ", ".join(f"{n}={b}" for n, b in alloc.weight_bits.items())
            + f" (cost {alloc.costs[c.budget_kind]:.6g}, {alloc.status.lower()}"
            + (f"; first and last pinned at {c.edge_bits} bits)" if c.edge_bits is not None else ")"))


# ----------------------------------------------------------------------------- quantize
def _calibrate(calibrate, variables, x: np.ndarray, bit_widths, batch_size: int = 128):
    """Fresh activation ranges from ``x`` (HAWQ-V3 calibrates min/max on training data)."""
    from hqjax.quant import STATS

    variables = {k: v for k, v in variables.items() if k != STATS}
    for i in range(0, len(x), batch_size):
        variables = calibrate(variables, x[i : i + batch_size], bit_widths)
    return variables


def _qat(job: Job, step, optimizer, variables, bit_widths):
    """Quantization-aware fine-tuning (HAWQ-V3 Sec. 4): ``qat_epochs`` of ``step``."""
    from hqjax.quant import init_qat_state, state_variables

    c, d = job.config, job.dataset
    steps_per_epoch = len(d.x_train) // c.batch_size
    state = init_qat_state(variables, optimizer, bit_widths=bit_widths)
    rng = np.random.default_rng(c.seed + 1)
    bar = progress_bar(total=c.qat_epochs * steps_per_epoch, desc="QAT", enabled=job.progress)
    for _ in range(c.qat_epochs):
        order = rng.permutation(len(d.x_train))
        for i in range(steps_per_epoch):
            idx = order[i * c.batch_size : (i + 1) * c.batch_size]
            state, m = step(state, d.x_train[idx], d.y_train[idx])
            bar.update(1)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}")
    bar.close()
    return state_variables(state)


class Finetuned(NamedTuple):
    """One configuration through :func:`make_quantize_finetune`: the (shared) fake-quant
    ``qmodel`` and the configuration's ``bit_widths`` for its ``apply``, the calibrated
    post-training variables ``ptq``, the variables after QAT ``qat`` and the ``integer`` model."""

    qmodel: Any
    bit_widths: dict
    ptq: dict
    qat: dict
    integer: Any


def make_quantize_finetune(job: Job, template: dict, *, pack_int4: bool = True,
                           share_program: bool = False) -> Callable[[dict], Finetuned]:
    """PTQ, QAT and integer conversion of the job's full-precision model, for any BitConfig
    over the layers of ``template`` (and its ``act_bits=None`` layers).

    Returns ``finetune(bit_config) -> Finetuned``: calibrated min/max activation ranges
    (post-training quantization), then ``qat_epochs`` of QAT (AdamW, cosine decay, BatchNorm
    frozen: it is folded into integer weights) and a fresh calibration, then BN folding and
    dyadic requantization (HAWQ-V3 Sec. 3-4) into an integer-only model. The widths are
    array inputs of one quantized model (``hqjax.bit_width_arrays``), so calibration and the
    QAT step compile once for every configuration of a sweep. ``pack_int4=False`` keeps the
    integer models of all configurations in one layout (int8 storage) and ``share_program=True``
    in one program (``hqjax.to_integer``), so their integer forward compiles once too.
    """
    import optax

    from hqjax.quant import bit_width_arrays, make_qat_step, quantize_model, to_integer

    c, d = job.config, job.dataset
    qmodel = quantize_model(job.model, template, params=job.variables["params"])
    calib = d.x_train[np.random.default_rng(c.seed + 2).permutation(len(d.x_train))[: c.calib_examples]]
    calibrate = jax.jit(lambda v, xb, bw: qmodel.calibrate(v, xb, train=False, bit_widths=bw))
    total = max(c.qat_epochs * (len(d.x_train) // c.batch_size), 1)
    optimizer = optax.adamw(optax.cosine_decay_schedule(c.qat_learning_rate, total), weight_decay=0.0)
    step = jax.jit(make_qat_step(qmodel, optimizer, batchnorm="freeze"))

    def finetune(bit_config: dict) -> Finetuned:
        bw = bit_width_arrays(bit_config)
        ptq = _calibrate(calibrate, job.variables, calib, bw)
        qat = _calibrate(calibrate, _qat(job, step, optimizer, ptq, bw), calib, bw) if c.qat_epochs else ptq
        integer = to_integer(quantize_model(job.model, bit_config), qat, d.input_shape, pack_int4=pack_int4,
                             float_islands=c.float_islands, input_dtype=d.input_dtype, share_program=share_program)
        return Finetuned(qmodel, bw, ptq, qat, integer)

    return finetune


def quantize_finetune(job: Job, bit_config: dict):
    """PTQ, QAT and integer conversion of the job's full-precision model under ``bit_config``
    (:func:`make_quantize_finetune` for one configuration).

    Returns ``(qmodel, ptq_variables, qat_variables, integer_model)``.
    """
    r = make_quantize_finetune(job, bit_config)(bit_config)
    return r.qmodel, r.ptq, r.qat, r.integer


def integer_accuracy(integer, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of an integer-only model (float only at the input and output boundary)."""
    fn = jax.jit(integer.__call__)
    logits = np.concatenate([np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])
    return float(np.mean(logits.argmax(-1) == y))


def stage_quantize(job: Job) -> None:
    """Calibrate, fine-tune with QAT, re-calibrate and convert to an integer-only model."""
    from hqjax.quant import load_bit_config, save_integer_model

    c, work = job.config, job.work
    bit_config = load_bit_config(work.path("bit_config.json"), job.blocks.names)
    _, ptq, qat, integer = quantize_finetune(job, bit_config)
    save_variables(work.path("ptq_model.msgpack"), ptq)
    save_variables(work.path("qat_model.msgpack"), qat)
    # written to a temporary folder and renamed, so a kill never leaves a half-written model
    tmp = work.path(f".int_model.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_integer_model(integer, tmp)
    shutil.rmtree(work.path("int_model"), ignore_errors=True)
    os.replace(tmp, work.path("int_model"))
    job.log(f"[quantize] calibrated on {c.calib_examples} examples, {c.qat_epochs} QAT epochs, "
            f"integer model written")


# ----------------------------------------------------------------------------- evaluate
def stage_evaluate(job: Job) -> None:
    """Accuracy and cost of every stage: full precision, PTQ, QAT (fake-quant), integer-only."""
    from hqjax.quant import load_bit_config, load_integer_model, quantize_model

    c, d, work = job.config, job.dataset, job.work
    names = job.blocks.names
    bit_config = load_bit_config(work.path("bit_config.json"), names)
    qmodel = quantize_model(job.model, bit_config, params=job.variables["params"])
    costs = layer_costs(job)
    fp_size = float(sum(costs.n_weights[n] * 4 + costs.n_bias.get(n, 0) * 4 for n in names))
    q_size = float(sum(costs.size_bytes(n, bit_config[n]["weight_bits"]) for n in names))
    bops = float(sum(costs.bops(n, bit_config[n]["weight_bits"], bit_config[n]["act_bits"]) for n in names))
    bits = "/".join(str(bit_config[n]["weight_bits"]) for n in names)
    integer = load_integer_model(work.path("int_model"))
    stages = {
        "full_precision": {"accuracy": accuracy(job.model.apply, job.variables, d.x_test, d.y_test),
                           "size_bytes": fp_size, "bits": "32"},
        "ptq_fake_quant": {"accuracy": accuracy(qmodel.apply, load_variables(work.path("ptq_model.msgpack")),
                                                d.x_test, d.y_test), "size_bytes": q_size, "bits": bits},
        "qat_fake_quant": {"accuracy": accuracy(qmodel.apply, load_variables(work.path("qat_model.msgpack")),
                                                d.x_test, d.y_test), "size_bytes": q_size, "bits": bits},
        "integer_only": {"accuracy": integer_accuracy(integer, d.x_test, d.y_test), "size_bytes": q_size,
                         "bits": bits},
    }
    alloc = work.read_json("allocation.json")
    used = alloc["costs"][c.budget_kind]
    work.write_json("metrics.json", {
        "stages": stages, "bops": bops, "n_test": int(len(d.x_test)),
        "budget": {"kind": c.budget_kind, "value": alloc["budget"], "used": used, "unit": alloc["unit"]}})
    job.log("[evaluate] " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in stages.items()))


# ----------------------------------------------------------------------------- report
def stage_report(job: Job) -> None:
    """Plots and ``report.md`` from whatever the earlier stages wrote."""
    from hqjax._report import make_plots, write_report

    paths = make_plots(job.work.root)
    paths.append(write_report(job.work.root))
    job.log("[report] wrote " + ", ".join(os.path.basename(p) for p in paths))


# ----------------------------------------------------------------------------- registry
STAGE_FUNCTIONS: dict[str, Callable[[Job], None]] = {
    "train": stage_train,
    "analyze": stage_analyze,
    "allocate": stage_allocate,
    "quantize": stage_quantize,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def report_only(config: RunConfig, *, log: Callable[[str], None] = print) -> Job:
    """Rebuild the plots and ``report.md`` from whatever the folder holds, running nothing else
    (after ``hqjax analyze`` this gives the density and trace plots)."""
    job = Job(config, log=log)
    if not job.work.exists("config.json"):
        raise UserError(f"{job.work.root} holds no hqjax results; run 'hqjax run --out {config.out}' first")
    stage_report(job)
    return job


def run_stages(config: RunConfig, until: str = "report", *, log: Callable[[str], None] = print,
               progress: bool | None = None, force: tuple[str, ...] = (), job: Job | None = None) -> Job:
    """Run every stage up to and including ``until``, skipping finished ones.

    A stage is skipped when its marker holds the current fingerprint (same relevant config
    and same upstream); ``force`` names stages to run regardless. ``job`` is a :class:`Job`
    built with model, variables or data objects (``hqjax.run`` makes one). Bad input (names,
    data, model, variables, budget) raises :class:`UserError` before anything is written.
    Returns the :class:`Job`.
    """
    if until not in STAGES:
        raise UserError(f"unknown stage {until!r}; stages are {list(STAGES)}")
    job = job or Job(config, log=log, progress=progress)
    check_names(config, model_given=job._given["model"] is not None, data_given=job._given["data"] is not None)
    job.check_inputs()
    if STAGES.index(until) >= STAGES.index("allocate"):
        check_budget(job)
    quantize = STAGES.index(until) >= STAGES.index("quantize")
    if quantize and not (job.work.is_done("quantize", job.fingerprints["quantize"]) and "quantize" not in force):
        job.check_integer_lowering()
    job.work.write_json("config.json", config.to_dict())
    for stage in STAGES[: STAGES.index(until) + 1]:
        fp = job.fingerprints[stage]
        if job.work.is_done(stage, fp) and stage not in force:
            log(f"[{stage}] up to date, skipped")
            continue
        t0 = time.perf_counter()
        STAGE_FUNCTIONS[stage](job)
        job.work.mark_done(stage, fp, time.perf_counter() - t0)
    return job


def run(model, variables=None, data=None, *, out: str = "hqjax_out", until: str = "report",
        log: Callable[[str], None] = print, progress: bool | None = None, force: tuple[str, ...] = (),
        **settings) -> Job:
    """The ``hqjax run`` job on a user's own model, weights and data.

    Parameters
    ----------
    model : a Flax Linen module (called as ``model.apply(variables, x, train=...)``), an NNX
        module, or a registered model name.
    variables : pretrained variables (Linen: the variables dict; NNX: ``hqjax.from_nnx``'s
        variables); then the train stage only records them (HAWQ starts from a trained
        model). An NNX module without them brings its own weights; a Linen module without
        them is trained first (``epochs``, ``learning_rate``, ...).
    data : ``(x_train, y_train, x_test, y_test)``, a mapping with those keys, an
        ``hqjax.data.Dataset``, or a data set name / ``.npz`` path.
    out : output folder (stages resume there as with the command).
    until : last stage to run (``'analyze'``, ``'allocate'``, ..., ``'report'``).
    settings : any other :class:`hqjax.config.RunConfig` field (``budget``, ``metric``,
        ``weight_bits``, ``num_probes``, ...).

    Returns
    -------
    The :class:`Job`: ``job.work.read_json('bit_config.json')``, ``'metrics.json'``, ...

    Raises
    ------
    UserError : bad input (data without a key, variables that do not fit the model, an
        unknown metric, an infeasible budget), before anything is written.
    """
    from hqjax.user_model import as_flax_model, tree_fingerprint

    given = {}
    if isinstance(model, str):
        settings["model"] = model
    else:
        flax_model, own = as_flax_model(model, "the model")
        given["model"] = model
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        settings["model"] = f"object:{kind}:{tree_fingerprint(repr(flax_model) if own is None else own)}"
        if variables is None and own is not None:
            variables = own
    if variables is not None:
        given["variables"] = variables
        settings["variables"] = f"object:{tree_fingerprint(variables)}"
    if data is None or isinstance(data, str):
        if data is not None:
            settings["dataset"] = data
    else:
        from hqjax.data import Dataset

        given["data"] = data
        arrays = (data.x_train, data.y_train, data.x_test, data.y_test) if isinstance(data, Dataset) else (
            data if isinstance(data, (tuple, list)) else {k: data[k] for k in data})
        settings["dataset"] = f"arrays:{tree_fingerprint(arrays)}"
    config = RunConfig.from_dict({**settings, "out": out})
    job = Job(config, log=log, progress=progress, **given)
    return run_stages(config, until, log=log, progress=progress, force=force, job=job)
