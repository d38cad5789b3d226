"""The end-to-end job: train, analyze, allocate, quantize, evaluate, report.

Each stage is a function of a :class:`Job` (the configuration, the output folder and lazily
loaded state) that reads what earlier stages wrote to the output folder and writes its own
files there atomically; :func:`run_stages` runs the stages up to a target, skipping those
whose marker carries the current fingerprint (see ``hqjax.config.stage_fingerprints``). The
analysis is resumable per layer: every layer's row of the sensitivity table is its own file,
computed from a PRNG key derived from the seed and the layer's index only, so a resumed run
produces exactly the result of an uninterrupted one.

The numerical work is the public API of the other areas: ``hqjax.curvature`` (HAWQ-V2
Hutchinson traces, HAWQ-V1 top eigenvalues, PyHessian's SLQ density), ``hqjax.quant``
(weight perturbation per bit, fake quantization, QAT, integer-only conversion) and
``hqjax.alloc`` (costs, sensitivity metrics, the ILP of HAWQ-V3 Sec. 3.4).
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hqjax._schema import sensitivity_document
from hqjax.config import STAGES, RunConfig, UserError, stage_fingerprints
from hqjax.train import (TrainConfig, accuracy, load_variables, make_loss_fn, progress_bar, save_variables,
                         train_cached)
from hqjax.workdir import Workdir

__all__ = ["Job", "run", "run_stages", "report_only", "check_names", "STAGE_FUNCTIONS", "quantize_finetune", "integer_accuracy",
           "sensitivity_from_rows", "layer_costs", "uniform_cost", "resolve_budget"]


def check_names(config: RunConfig, *, model_given: bool = False, data_given: bool = False) -> None:
    """Fail before any work when a model, data set or metric name is unknown (a user model
    ``'package.module:factory'`` and an ``.npz`` path are checked when the job loads them)."""
    from hqjax.data import DATASETS
    from hqjax.models import MODELS

    if not model_given and ":" not in config.model and config.model not in MODELS:
        raise UserError(f"unknown model {config.model!r}; valid models: {', '.join(sorted(MODELS))}, "
                        f"or your own as 'package.module:factory'")
    if (not data_given and not config.dataset.endswith(".npz") and config.dataset not in DATASETS
            and config.data_dir is None):
        raise UserError(
            f"unknown dataset {config.dataset!r}; valid datasets: {', '.join(sorted(DATASETS))}, "
            f"an .npz file with x_train, y_train, x_test, y_test, "
            f"or a TensorFlow Datasets name together with --data-dir (its prepared folder)")
    _check_metric(config.metric)


def _check_metric(name: str) -> None:
    from hqjax.alloc import metric_names

    if name not in metric_names():
        raise UserError(f"unknown metric {name!r}; registered metrics: {', '.join(metric_names())}")


class Job:
    """A configuration, its output folder, and state loaded on first use.

    Parameters
    ----------
    config : the run's configuration.
    model : a Flax model object (Linen, or NNX) used instead of ``config.model``.
    variables : its pretrained variables (a Linen variables dict, or an NNX model's
        ``hqjax.from_nnx`` variables); an NNX ``model`` without them brings its own weights.
    data : arrays instead of ``config.dataset`` (see ``hqjax.data.dataset_from_arrays``).
    log : where one-line progress messages go (``print`` by default).
    progress : show progress bars (``None``: only when stderr is a terminal).
    """

    def __init__(self, config: RunConfig, *, model=None, variables=None, data=None,
                 log: Callable[[str], None] = print, progress: bool | None = None):
        self.config = config
        self.work = Workdir(config.out)
        self.fingerprints = stage_fingerprints(config)
        self.log = log
        self.progress = progress
        self.units_written = 0
        self._given = {"model": model, "variables": variables, "data": data}

    @functools.cached_property
    def dataset(self):
        from hqjax.data import dataset_from_arrays, load_dataset

        c = self.config
        try:
            if self._given["data"] is not None:
                return dataset_from_arrays(self._given["data"])
            return load_dataset(c.dataset, c.data_dir, seed=c.seed)
        except (FileNotFoundError, ImportError) as e:  # tfds folder not prepared, optional extra missing
            raise UserError(str(e)) from None
        except ValueError as e:  # an unknown data set name, an .npz without a key
            raise UserError(str(e)) from None

    @functools.cached_property
    def _model_and_own(self):
        """``(model in Linen convention, variables it brings or None)``."""
        from hqjax.user_model import as_flax_model, load_factory

        c = self.config
        if self._given["model"] is not None:
            return as_flax_model(self._given["model"], "the model")
        if c.model.startswith("object:") or (c.variables or "").startswith("object:"):
            raise UserError(f"{c.out!r} was made by hqjax.run with a model or variables object; run it again "
                            f"from Python with the same objects, or give --model and --variables")
        if ":" in c.model:
            factory = load_factory(c.model)
            try:
                obj = factory()
            except Exception as e:  # noqa: BLE001 - user code failing is bad input, reported in one line
                raise UserError(f"--model {c.model!r}: calling it failed ({type(e).__name__}: {e})") from None
            model, _ = as_flax_model(obj, f"what --model {c.model!r} returned")
            return model, None  # a factory's fresh NNX module is an initialisation, not trained weights
        from hqjax.models import get_model

        return get_model(c.model, num_classes=self.dataset.num_classes), None

    @property
    def model(self):
        return self._model_and_own[0]

    @property
    def user_model(self) -> bool:
        """True for a model hqjax does not ship (an object or a factory)."""
        return self._given["model"] is not None or ":" in self.config.model

    @functools.cached_property
    def pretrained(self):
        """Pretrained variables, checked against the model, or None (then the job trains)."""
        from hqjax.user_model import check_variables, load_variables_file

        c, given = self.config, self._given["variables"]
        where = "the variables"
        if given is None and c.variables and self._given["model"] is None:
            given, where = load_variables_file(c.variables), f"--variables {c.variables!r}"
        if given is None:
            given = self._model_and_own[1]
        if given is None:
            return None
        return check_variables(self.model, given, self.dataset.input_shape, where)

    def check_inputs(self) -> None:
        """Load and check the data, the model and pretrained variables (before any work)."""
        from hqjax.train import init_variables
        from hqjax.tree import blocks

        _ = self.dataset, self.model, self.pretrained
        shapes = jax.eval_shape(lambda: init_variables(self.model, jax.random.PRNGKey(0), self.dataset.input_shape))
        if not blocks(shapes["params"]).names:
            raise UserError(f"model {self.config.model!r} has no layer with a 'kernel' or 'embedding' parameter "
                            f"(Linen Dense/Conv/Embed, NNX Linear/Conv/Embed), so there is nothing to quantize")

    @property
    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=c.batch_size, learning_rate=c.learning_rate, seed=c.seed)

    @functools.cached_property
    def variables(self):
        """Full-precision variables written by the train stage."""
        return load_variables(self.work.path("fp_model.msgpack"))

    @functools.cached_property
    def blocks(self):
        from hqjax.tree import blocks

        return blocks(self.variables["params"]).require(f"the params of {self.config.model}")

    def unit_written(self) -> None:
        self.units_written += 1


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


# ----------------------------------------------------------------------------- analyze
def _hessian_batches(job: Job):
    """The (seeded) training subset the curvature is measured on, as stacked masked batches."""
    from hqjax.data import stack_batches

    c, d = job.config, job.dataset
    idx = np.random.default_rng(c.seed).permutation(len(d.x_train))[: c.hessian_examples]
    xs, ys, counts = stack_batches(d.x_train[idx], d.y_train[idx], min(c.hessian_batch, len(idx)))
    masks = np.arange(xs.shape[1])[None, :] < counts[:, None]
    return (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(masks)), jnp.asarray(counts)


def _analysis_loss(job: Job):
    """The mean loss over the analysis batches as a function of the params."""
    from hqjax.curvature import dataset_loss

    batches, counts = _hessian_batches(job)
    # Convolution gradients inside a scan body are slow on XLA:CPU; a few batches are
    # unrolled instead.
    unroll = True if counts.shape[0] <= 8 else 1
    return dataset_loss(make_loss_fn(job.model, job.variables), batches, counts, unroll=unroll)


def _needs_eigenvalues(job: Job) -> bool:
    from hqjax.config import analysis_needs_eigenvalues

    return analysis_needs_eigenvalues(job.config.metric)


def _layer_key(job: Job, index: int):
    return jax.random.fold_in(jax.random.PRNGKey(job.config.seed), index)


def _hessian_layer(job: Job, f, index: int, name: str, *, trace: bool = True) -> dict:
    """One layer's Hessian trace (per-layer Hutchinson on the layer's own function, adaptive)
    and, when the metric reads them, its top eigenvalues (Lanczos on the same function)."""
    from hqjax.curvature import block_function, hessian, layer_traces, top_eigenvalues

    c, params, blk = job.config, job.variables["params"], job.blocks
    k_trace, k_eig = jax.random.split(_layer_key(job, index))
    out = {"top_eigenvalues": []}
    if trace:
        res = layer_traces(f, params, k_trace, blocks=blk, names=[name], rtol=c.trace_rtol,
                           min_probes=min(10, max(2, c.num_probes)), max_probes=max(2, c.num_probes))
        out.update(trace=float(res.traces[0]), trace_stderr=float(res.stderr[0]), num_probes=int(res.num_probes[0]))
    if _needs_eigenvalues(job):
        f_b, theta = block_function(f, params, blk, name)
        size = blk.sizes[blk.index(name)]
        eig = top_eigenvalues(hessian(f_b, theta), theta, k_eig, k=min(c.top_k, size), method="lanczos",
                              max_iters=min(max(c.eig_iters, c.top_k), size), tol=1e-3)
        out["top_eigenvalues"] = [float(x) for x in np.asarray(eig.eigenvalues)]
    return out


def _proxy_traces(job: Job) -> dict:
    """Every layer's Gauss-Newton / Fisher trace at once (no probe noise for ``'ggn'``)."""
    from hqjax.curvature import empirical_fisher_layer_traces, fisher_layer_traces, ggn_layer_traces

    c, params, blk = job.config, job.variables["params"], job.blocks
    (xs, ys, masks), _ = _hessian_batches(job)
    keep = np.asarray(masks).reshape(-1)
    x = jnp.asarray(np.asarray(xs).reshape(-1, *xs.shape[2:])[keep])
    y = jnp.asarray(np.asarray(ys).reshape(-1)[keep])
    rest = {k: v for k, v in job.variables.items() if k != "params"}
    model_fn = lambda p, xb: job.model.apply({"params": p, **rest}, xb, train=False)
    if c.curvature == "ggn":
        res = ggn_layer_traces(model_fn, params, x, blocks=blk)
    elif c.curvature == "empirical_fisher":
        res = empirical_fisher_layer_traces(model_fn, params, x, y, blocks=blk)
    else:
        res = fisher_layer_traces(model_fn, params, x, _layer_key(job, 20_000), blocks=blk)
    return {n: {"trace": t, "trace_stderr": se, "num_probes": int(np.asarray(res.num_probes)[i])}
            for i, (n, (t, se)) in enumerate(res.per_block().items())}


def _layer_row(job: Job, index: int, name: str, curvature: dict) -> dict:
    """One row of the sensitivity table: the curvature numbers plus the weight perturbations."""
    from hqjax.quant import weight_perturbation

    c, params, blk = job.config, job.variables["params"], job.blocks
    w = blk.kernel(params, name)
    n = int(blk.sizes[blk.index(name)])
    pert = jax.jit(weight_perturbation, static_argnums=1)
    return {
        "layer": name,
        "index": index,
        "n_params": n,
        "n_weights": int(np.size(w)),
        "curvature": c.curvature,
        "trace": curvature["trace"],
        "trace_stderr": curvature["trace_stderr"],
        "num_probes": curvature["num_probes"],
        "avg_trace": curvature["trace"] / n,
        "top_eigenvalues": curvature.get("top_eigenvalues", []),
        "perturbation": {str(b): float(pert(w, b)) for b in c.weight_bits},
        "weight_norm_sq": float(np.sum(np.square(np.asarray(w, np.float64)))),
    }


def _density(job: Job, f) -> dict:
    from hqjax.curvature import hessian, spectral_density

    c, params = job.config, job.variables["params"]
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 10_000)
    res = spectral_density(hessian(f, params), params, key, num_steps=c.density_steps)
    return {"nodes": np.asarray(res.nodes).tolist(), "weights": np.asarray(res.weights).tolist()}


def stage_analyze(job: Job) -> None:
    """Per-layer sensitivity (resumable layer by layer) and the full-model eigenvalue density.

    The method follows the metric and the curvature source: with ``curvature='hessian'``
    each layer's trace is Hutchinson on the layer's own (pruned) function, stopped at
    ``trace_rtol``, one layer per unit of work; eigenvalues (per layer, Lanczos) only when
    the metric reads them. With ``'ggn'`` / ``'fisher'`` / ``'empirical_fisher'`` every
    layer's trace comes from one per-example pass (one unit of work), and eigenvalues, if
    needed, from the per-layer Hessian as above.
    """
    fp, work, blk, c = job.fingerprints["analyze"], job.work, job.blocks, job.config
    f = _analysis_loss(job)
    t0 = time.perf_counter()
    proxies = None
    if c.curvature != "hessian":
        unit = os.path.join("analysis", f"{c.curvature}.json")
        if work.exists(unit) and work.read_json(unit).get("fingerprint") == fp:
            proxies = work.read_json(unit)["layers"]
        else:
            proxies = _proxy_traces(job)
            work.write_json(unit, {"fingerprint": fp, "layers": proxies})
            job.unit_written()
    rows = []
    bar = progress_bar(total=len(blk) + 1, desc="analyze", enabled=job.progress)
    for i, name in enumerate(blk.names):
        unit = os.path.join("analysis", f"layer_{i:03d}.json")
        if work.exists(unit) and work.read_json(unit).get("fingerprint") == fp:
            row = work.read_json(unit)["row"]
            job.log(f"[analyze] {name}: done before, reused")
        else:
            if proxies is None:
                curv = _hessian_layer(job, f, i, name)
            else:
                curv = dict(proxies[name], **_hessian_layer(job, f, i, name, trace=False))
            row = _layer_row(job, i, name, curv)
            work.write_json(unit, {"fingerprint": fp, "row": row})
            eig = row["top_eigenvalues"]
            job.log(f"[analyze] {name}: {c.curvature} trace {row['trace']:.4g} ± {row['trace_stderr']:.2g} "
                    f"({row['num_probes']} probes)" + (", top eigenvalues " + ", ".join(f"{e:.4g}" for e in eig)
                                                      if eig else ""))
            job.unit_written()
        rows.append(row)
        bar.update(1)
    unit = os.path.join("analysis", "density.json")
    if work.exists(unit) and work.read_json(unit).get("fingerprint") == fp:
        density = work.read_json(unit)["density"]
    else:
        density = _density(job, f)
        work.write_json(unit, {"fingerprint": fp, "density": density})
        job.unit_written()
    bar.update(1)
    bar.close()
    c = job.config
    work.write_json("sensitivity.json", sensitivity_document(  # the one schema (hqjax._schema)
        rows, model=c.model, dataset=c.dataset, seed=c.seed, curvature=c.curvature, num_probes=c.num_probes,
        trace_rtol=c.trace_rtol, hessian_examples=c.hessian_examples, weight_bits=list(c.weight_bits)))
    work.write_json("density.json", density)
    job.log(f"[analyze] {len(rows)} layers and the density in {time.perf_counter() - t0:.1f} s")


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

    x = jax.ShapeDtypeStruct((1, *job.dataset.input_shape), jnp.float32)
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


def resolve_budget(config: RunConfig, costs, names) -> float:
    """The absolute budget: a fraction of the INT8 model's cost, or the absolute value given."""
    from hqjax.config import parse_budget

    form, value = parse_budget(config.budget)
    if form == "fraction":
        return value * uniform_cost(costs, config.budget_kind, names, 8, config.act_bits)
    return value


_UNITS = {"size": "bytes", "bops": "BOPs", "latency": "µs"}


def _allocate(table, costs, config: RunConfig, limit: float):
    from hqjax.alloc import InfeasibleBudgetError, allocate

    kind = config.budget_kind
    try:
        return allocate(table, costs, {kind: limit}, candidates=config.weight_bits, metric=config.metric,
                        act_candidates=(config.act_bits,))
    except InfeasibleBudgetError as e:
        int8 = uniform_cost(costs, kind, costs.names, 8, config.act_bits)
        smallest = e.minimal[kind]
        raise UserError(
            f"{kind} budget {config.budget!r} = {limit:.6g} {_UNITS[kind]} is infeasible with candidate bits "
            f"{list(config.weight_bits)}: the smallest feasible {kind} budget is {smallest:.6g} {_UNITS[kind]} "
            f"(--budget {smallest:.6g}, or {smallest / int8:.4f} of the INT8 model)") from None


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
    shapes = jax.eval_shape(lambda: init_variables(job.model, jax.random.PRNGKey(0), job.dataset.input_shape))
    costs = layer_costs(job, shapes)
    zero = {n: {b: 0.0 for b in c.weight_bits} for n in costs.names}
    _allocate(zero, costs, c, resolve_budget(c, costs, costs.names))


def pareto_points(table, costs, config: RunConfig, num: int = 24) -> list[dict]:
    """The cost/sensitivity frontier: the optimal allocation at ``num`` budgets between the
    cheapest and the dearest configuration (HAWQ-V2 Sec. 3.3's Pareto frontier)."""
    kind, names = config.budget_kind, table.names
    lo = uniform_cost(costs, kind, names, min(config.weight_bits), config.act_bits)
    hi = uniform_cost(costs, kind, names, max(config.weight_bits), config.act_bits)
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

    c, work = job.config, job.work
    rows = work.read_json("sensitivity.json")["layers"]
    table = sensitivity_from_rows(rows)
    costs = layer_costs(job)
    limit = resolve_budget(c, costs, table.names)
    alloc = _allocate(table, costs, c, limit)
    scores = sensitivity_scores(table, c.weight_bits, c.metric)
    uniform = [{"bits": b, "cost": uniform_cost(costs, c.budget_kind, table.names, b, c.act_bits),
                "sensitivity": float(sum(scores[n][b] for n in table.names))} for b in c.weight_bits]
    work.write_json("bit_config.json", alloc.bit_config)
    work.write_json("allocation.json", {**alloc.to_dict(), "budget_kind": c.budget_kind, "budget": limit,
                                        "unit": _UNITS[c.budget_kind], "costs_table": costs.to_dict()})
    work.write_json("pareto.json", {"kind": c.budget_kind, "unit": _UNITS[c.budget_kind], "metric": c.metric,
                                    "budget": limit, "points": pareto_points(table, costs, c), "uniform": uniform,
                                    "chosen": {"cost": alloc.costs[c.budget_kind], "sensitivity": alloc.objective,
                                               "bits": alloc.weight_bits}})
    job.log(f"[allocate] {c.metric}, {c.budget_kind} budget {limit:.6g} {_UNITS[c.budget_kind]}: "
            + ", ".join(f"{n}={b}" for n, b in alloc.weight_bits.items())
            + f" (cost {alloc.costs[c.budget_kind]:.6g}, {alloc.status.lower()})")


# ----------------------------------------------------------------------------- quantize
def _calibrate(qmodel, variables, x: np.ndarray, batch_size: int = 128):
    """Fresh activation ranges from ``x`` (HAWQ-V3 calibrates min/max on training data)."""
    from hqjax.quant import STATS

    variables = {k: v for k, v in variables.items() if k != STATS}
    calibrate = jax.jit(lambda v, xb: qmodel.calibrate(v, xb, train=False))
    for i in range(0, len(x), batch_size):
        variables = calibrate(variables, x[i : i + batch_size])
    return variables


def _qat(job: Job, qmodel, variables):
    """Quantization-aware fine-tuning (HAWQ-V3 Sec. 4) with ``hqjax.make_qat_step``: AdamW,
    cosine decay, BatchNorm statistics frozen (they are folded into integer weights)."""
    import optax

    from hqjax.quant import init_qat_state, make_qat_step, state_variables

    c, d = job.config, job.dataset
    steps_per_epoch = len(d.x_train) // c.batch_size
    total = max(c.qat_epochs * steps_per_epoch, 1)
    optimizer = optax.adamw(optax.cosine_decay_schedule(c.qat_learning_rate, total), weight_decay=0.0)
    step = jax.jit(make_qat_step(qmodel, optimizer, batchnorm="freeze"))
    state = init_qat_state(variables, optimizer)
    rng = np.random.default_rng(c.seed + 1)
    bar = progress_bar(total=total, desc="QAT", enabled=job.progress)
    for _ in range(c.qat_epochs):
        order = rng.permutation(len(d.x_train))
        for i in range(steps_per_epoch):
            idx = order[i * c.batch_size : (i + 1) * c.batch_size]
            state, m = step(state, d.x_train[idx], d.y_train[idx])
            bar.update(1)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}")
    bar.close()
    return state_variables(state)


def quantize_finetune(job: Job, bit_config: dict):
    """PTQ, QAT and integer conversion of the job's full-precision model under ``bit_config``.

    Returns ``(qmodel, ptq_variables, qat_variables, integer_model)``: calibrated min/max
    activation ranges (post-training quantization), then ``qat_epochs`` of QAT and a fresh
    calibration, then BN folding and dyadic requantization (HAWQ-V3 Sec. 3) into an
    integer-only model.
    """
    from hqjax.quant import quantize_model, to_integer

    c, d = job.config, job.dataset
    qmodel = quantize_model(job.model, bit_config, params=job.variables["params"])
    calib = d.x_train[np.random.default_rng(c.seed + 2).permutation(len(d.x_train))[: c.calib_examples]]
    ptq = _calibrate(qmodel, job.variables, calib)
    qat = _calibrate(qmodel, _qat(job, qmodel, ptq), calib) if c.qat_epochs else ptq
    return qmodel, ptq, qat, to_integer(qmodel, qat, d.input_shape)


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
    from hqjax.report import make_plots, write_report

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
