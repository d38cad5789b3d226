"""Does the Hessian-aware allocation beat uniform, random and reversed ones at equal budget?

The ablation of HAWQ-V2 (Dong et al. 2020, Sec. 4.3) and HAWQ-V3 (Yao et al. 2021, Sec. 4) on
a 19-layer ResNet: for each seed, the job's own stages train the full-precision model and
measure per-layer Hessian traces (``hqjax.pipeline.run_stages(..., until='analyze')``); the
Gauss-Newton traces come with that analysis, the empirical Fisher traces and the per-layer top
eigenvalues (HAWQ-V1, Q-BERT) are measured here. Every method of ``_ablation.METHODS`` then
picks bits at every budget, and every distinct configuration is calibrated, fine-tuned with
QAT and converted to integer-only (``hqjax.pipeline.make_quantize_finetune``: the bit widths
are inputs of one quantized model, so calibration, QAT and evaluation compile once per seed).

Budgets (the first and last layer at 8 bits throughout, as in HAWQ-V3): model sizes and BOPS
of uniform-equivalent widths between W2 and W4 (``--widths``), one measured-latency budget,
and the HAWQ-V3 setting where activations follow the weights (candidates 4 and 8, a BOPS
budget a quarter of the way from uniform W4A4 to W8A8).

Reports fake-quant and integer-only test accuracy, mean ± std over seeds, and per budget the
paired per-seed difference of every method against uniform and against the mean of the
random draws, with a verdict (win / tie / loss: the 95% t-interval of the mean difference).
Progress is saved after every configuration: re-running the command resumes. ``--jobs N``
starts N single-threaded worker processes that take each seed's training and analysis, then
single configurations of any analyzed seed, as they come free (one per core: no core idles
while work is left, none runs two processes).

The model may be the user's own, as for ``hqjax run``: ``--model package.module:factory``
(a Linen module or an NNX module; the job trains it).

    python benchmarks/accuracy_table.py --model resnet20 --dataset mnist_subset --seeds 0 1 2 --jobs 2
    python benchmarks/accuracy_table.py --quick          # one seed, one budget, one epoch
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _ablation as ab  # noqa: E402
import _workers  # noqa: E402


def _read(path):
    with open(path) as f:
        return json.load(f)


def _write(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def seed_analysis(job, args) -> dict:
    """The per-layer inputs of every method, measured once per seed and saved in the job's folder."""
    import jax

    from hqjax.curvature import LayerTraceResult, empirical_fisher_layer_traces

    path = job.work.path("ablation_inputs.json")
    if os.path.exists(path):
        return _read(path)
    t0 = time.perf_counter()
    params, blk = job.variables["params"], job.blocks
    x, y = job.analysis_examples()
    ggn = LayerTraceResult.from_dict(job.work.read_json("analysis/ggn.json")["result"]).per_block()
    fisher = empirical_fisher_layer_traces(job.logits_fn(), params, x, y, blocks=blk).per_block()
    eig = ab.layer_eigenvalue_samples(job.logits_fn(), params, blk, x[: args.eig_examples], y[: args.eig_examples],
                                      jax.random.PRNGKey(10_000 + job.config.seed), subsets=args.eig_subsets,
                                      iters=args.eig_iters)
    out = {"ggn": {n: float(t) for n, (t, _) in ggn.items()}, "fisher": {n: float(t) for n, (t, _) in fisher.items()},
           "eigenvalue_samples": eig, "seconds": round(time.perf_counter() - t0, 1)}
    _write(path, out)
    return out


def budgets(costs, names, args, latency_costs=None) -> list[ab.Budget]:
    out = [ab.budget_at(costs, "size", names, w, candidates=args.bits) for w in args.widths]
    out += [ab.budget_at(costs, "bops", names, w, candidates=args.bits) for w in args.bops_widths]
    if latency_costs is not None and args.latency_width:
        b = ab.budget_at(latency_costs, "latency", names, args.latency_width, candidates=args.bits)
        out.append(b)
    if args.act_follows:
        lo = ab.config_cost(costs, "bops", names, ab.uniform_bits(names, 4), "weights")
        hi = ab.config_cost(costs, "bops", names, ab.uniform_bits(names, 8), "weights")
        out.append(ab.Budget("W4A4+25%", "bops", lo + 0.25 * (hi - lo), (4, 8), "weights"))
    return out


def _accuracy(fn, args, x, y, batch: int = 500) -> float:
    """Top-1 accuracy of ``fn(*args, xb)`` over equal batches (one compiled shape)."""
    n = len(x)
    pad = -n % batch
    xp = np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x
    logits = np.concatenate([np.asarray(fn(*args, xp[i : i + batch])) for i in range(0, len(xp), batch)])[:n]
    return float(np.mean(logits.argmax(-1) == y))


def make_evaluate(job):
    """``evaluate(bits, act) -> {ptq, fake_quant, integer, seconds}``: PTQ, QAT (fake-quant)
    and integer-only test accuracy of one configuration. The widths are inputs of one
    quantized model (``hqjax.pipeline.make_quantize_finetune``) and the models are arguments
    of the compiled evaluations; every configuration's integer model runs one compiled program
    (``share_program``: its zero points and shifts are array arguments)."""
    import jax

    from hqjax.pipeline import make_quantize_finetune

    d = job.dataset
    finetune = make_quantize_finetune(job, ab.bit_config({n: 8 for n in job.blocks.names}, 8), pack_int4=False,
                                      share_program=True)
    fake_quant = None
    # called eagerly: IntegerModel.forward compiles per program, which configurations share
    integer = lambda m, xb: m(xb)  # noqa: E731

    def evaluate(bits: dict, act) -> dict:
        nonlocal fake_quant
        t0 = time.perf_counter()
        r = finetune(ab.bit_config(bits, act))
        if fake_quant is None:  # one quantized model serves every configuration
            qmodel = r.qmodel
            fake_quant = jax.jit(lambda v, bw, xb: qmodel.apply(v, xb, train=False, bit_widths=bw))
        return {"ptq": _accuracy(fake_quant, (r.ptq, r.bit_widths), d.x_test, d.y_test),
                "fake_quant": _accuracy(fake_quant, (r.qat, r.bit_widths), d.x_test, d.y_test),
                "integer": _accuracy(integer, (r.integer,), d.x_test, d.y_test),
                "seconds": round(time.perf_counter() - t0, 2)}

    return evaluate


def latency_table(args) -> str:
    """The path of the model's measured latency table ``{layer: {bits: µs}}``, measured once
    per model and input before any seed runs (so every seed shares it and nothing else runs
    while it is timed). XLA:CPU's int8 product takes the same time at 2-8 bits, so the layers
    are timed with the bit-serial kernel (``hqjax.alloc.bit_serial_op``), whose time grows
    with the width as on hardware with sub-byte arithmetic."""
    path = os.path.join(args.work, f"latency_bitserial_{_slug(args, '_')}.json")
    if not os.path.exists(path):
        import jax

        from hqjax.alloc import bit_serial_op, layer_shapes, measure_latency_table
        from hqjax.pipeline import Job
        from hqjax.train import init_variables

        job = Job(seed_config(args, 0))
        x = jax.ShapeDtypeStruct((1, *job.dataset.input_shape), job.dataset.input_dtype)
        variables = jax.eval_shape(lambda: init_variables(job.model, jax.random.PRNGKey(0), job.dataset.input_shape))
        os.makedirs(args.work, exist_ok=True)
        _write(path, measure_latency_table(layer_shapes(job.model, variables, x, train=False),
                                           sorted(set(args.bits) | {8}), op=bit_serial_op, repeats=50))
    return path


def _slug(args, sep: str = "-") -> str:
    """``model-dataset`` as a file name (a user's ``package.module:factory`` included)."""
    return re.sub(r"[^\w.-]+", "_", f"{args.model}{sep}{args.dataset}")


def seed_config(args, seed: int):
    """The job's configuration for one seed: the model, data and training of the command line,
    analysis and per-layer widths as the ablation needs them."""
    from hqjax.config import RunConfig

    return RunConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, seed=seed,
                     out=os.path.join(args.work, f"{_slug(args)}-s{seed}"), epochs=args.epochs,
                     batch_size=args.batch_size, learning_rate=args.learning_rate, qat_epochs=args.qat_epochs,
                     num_probes=args.probes, hessian_examples=args.hessian_examples,
                     weight_bits=tuple(sorted(set(args.bits) | {4, 8})), density_steps=4, top_k=1, eig_iters=4)


def check_inputs(args) -> str | None:
    """One line naming what is wrong with the command line, or None; loads the data and
    the model (a user's factory included) and writes nothing."""
    from hqjax.config import UserError
    from hqjax.pipeline import Job, check_names

    if args.jobs < 1:
        return f"--jobs {args.jobs}: give at least 1 worker process"
    if not set(args.bits) <= set(range(2, 9)):
        return f"--bits {' '.join(map(str, args.bits))}: widths are integers from 2 to 8"
    cfg = seed_config(args, args.seeds[0])
    try:
        check_names(cfg)
        Job(cfg).check_inputs()
    except UserError as e:
        return str(e)
    return None


class SeedPlan(NamedTuple):
    """One seed's trained and analyzed job and every row to evaluate:
    ``plan = [(budget, method, bits, budget used)]``."""

    seed: int
    job: Any
    costs: Any
    names: list
    fp: float
    plan: list
    started: float


def prepare_seed(seed: int, args, log) -> SeedPlan:
    """Train, analyze and allocate with every method at every budget (resumable: a seed done
    before loads its saved stages)."""
    from hqjax.pipeline import layer_costs, run_stages
    from hqjax.train import accuracy

    cfg = seed_config(args, seed)
    t0 = time.perf_counter()
    job = run_stages(cfg, "analyze", log=lambda s: None, progress=False)
    inputs = seed_analysis(job, args)
    rows = job.work.read_json("sensitivity.json")["layers"]
    costs = layer_costs(job)
    names = list(costs.names)
    latency_costs = costs.with_latency(latency_table(args)) if args.latency_width else None
    fp = accuracy(job.model.apply, job.variables, job.dataset.x_test, job.dataset.y_test)
    log(f"seed {seed}: float {fp:.4f} after {args.epochs} epochs; analysis and proxies in "
        f"{time.perf_counter() - t0:.0f} s")
    tables = ab.tables(rows, inputs["ggn"], inputs["fisher"], inputs["eigenvalue_samples"])
    rng = np.random.default_rng(1000 + seed)
    plan = []
    for b in budgets(costs, names, args, latency_costs):
        cost_of = latency_costs if b.kind == "latency" else costs
        for label, bits in ab.allocations(tables, cost_of, b, names, rng, args.random).items():
            plan.append((b, label, bits, ab.config_cost(cost_of, b.kind, names, bits, b.act) / b.limit))
    return SeedPlan(seed, job, costs, names, fp, plan, t0)


def _done(job) -> dict:
    """Every configuration of the job evaluated so far, by any process: ``{key: accuracies}``
    (each process writes its own results file)."""
    out = {}
    for path in sorted(glob.glob(job.work.path("ablation_results*.json"))):
        out.update(_read(path))
    return out


def _todo(sp: SeedPlan, done: dict) -> dict:
    """``{key: (bits, act)}`` of the plan's configurations not in ``done``, in plan order."""
    return {_key(bits, b.act): (bits, b.act) for b, _, bits, _ in sp.plan if _key(bits, b.act) not in done}


def seed_rows(sp: SeedPlan, done: dict) -> list[dict]:
    """The result rows of one seed: its float model and every planned (budget, method)."""
    costs, names = sp.costs, sp.names
    size8 = ab.config_cost(costs, "size", names, {n: 8 for n in names}, 8)
    out = [{"seed": sp.seed, "budget": "full precision", "kind": "-", "method": "float", "bits": "32", "used": 1.0,
            "size_frac": 4.0, "ptq": sp.fp, "fake_quant": sp.fp, "integer": None}]
    for b, label, bits, used in sp.plan:
        out.append({"seed": sp.seed, "budget": b.label, "kind": b.kind, "act": b.act, "method": label,
                    "bits": "".join(str(bits[n]) for n in names), "used": used,
                    "size_frac": ab.config_cost(costs, "size", names, bits, 8) / size8, **done[_key(bits, b.act)]})
    return out


def run_seed(seed: int, args, log) -> list[dict]:
    """Train, analyze, allocate with every method at every budget, and evaluate (resumable)."""
    from hqjax.train import progress_bar

    sp = prepare_seed(seed, args, log)
    done = _done(sp.job)
    todo = _todo(sp, done)
    path = sp.job.work.path("ablation_results.json")
    mine = _read(path) if os.path.exists(path) else {}
    evaluate = make_evaluate(sp.job) if todo else None
    for key, (bits, act) in progress_bar(todo.items(), total=len(todo), desc=f"seed {seed} QAT",
                                         enabled=args.progress):
        mine[key] = done[key] = evaluate(bits, act)
        _write(path, mine)
    log(f"seed {seed}: {len(todo)} configurations evaluated ({len(sp.plan)} rows) in "
        f"{time.perf_counter() - sp.started:.0f} s")
    return seed_rows(sp, done)


def work(args, log) -> None:
    """One process of ``--jobs``: it takes any seed's training and analysis not yet taken,
    then single configurations of any analyzed seed, until every one is taken
    (``_workers.Claims``), so no core idles while work is left and none runs two processes."""
    claims = _workers.Claims(os.path.join(args.work, "claims", args.run_id))
    k = args.worker % len(args.seeds)
    left = args.seeds[k:] + args.seeds[:k]
    plans, todo, evaluators = {}, {}, {}
    while left:
        seed = next((s for s in left if s not in plans and claims.take(f"seed{s}")), None)
        if seed is not None:  # training and analysis first: they open a seed to every worker
            plans[seed] = prepare_seed(seed, args, log)
            claims.finish(f"seed{seed}")
        for s in left:
            if s not in plans and claims.finished(f"seed{s}"):
                plans[s] = prepare_seed(s, args, log)  # loads what the other worker saved
        pick = None
        for s in [s for s in left if s in plans]:
            queue = todo.setdefault(s, list(_todo(plans[s], _done(plans[s].job)).items()))
            while queue and pick is None:
                key, config = queue.pop(0)
                if claims.take(f"cfg-s{s}-{key}"):
                    pick = (s, key, config)
            if pick is not None:
                break
            left.remove(s)  # every configuration of this seed is taken
        if pick is None:
            if left:  # waiting for another worker's training and analysis
                time.sleep(2)
            continue
        s, key, (bits, act) = pick
        if s not in evaluators:
            evaluators[s] = make_evaluate(plans[s].job)
        path = plans[s].job.work.path(f"ablation_results.w{args.worker}.json")
        mine = _read(path) if os.path.exists(path) else {}
        mine[key] = evaluators[s](bits, act)
        _write(path, mine)
        claims.finish(f"cfg-s{s}-{key}")
        log(f"seed {s}: {key} in {mine[key]['seconds']:.0f} s")


def _key(bits: dict, act) -> str:
    return "".join(map(str, bits.values())) + f"/a{act}"


# ----------------------------------------------------------------------------- tables
def _ms(values) -> str:
    v = np.array([x for x in values if x is not None], float) * 100
    return "—" if v.size == 0 else f"{v.mean():.2f} ± {v.std():.2f}"


def _by_seed(rs, method):
    """Per-seed accuracy of a method (random: the mean of its draws)."""
    out = {}
    for s in sorted({r["seed"] for r in rs}):
        v = [r["fake_quant"] for r in rs if r["seed"] == s and (r["method"] == method or
                                                               (method == "random" and r["method"].startswith("random")))]
        if v:
            out[s] = float(np.mean(v))
    return out


def _diff(rs, method, ref) -> str:
    a, b = _by_seed(rs, method), _by_seed(rs, ref)
    common = sorted(set(a) & set(b))
    if not common:
        return "—"
    mean, se, verdict = ab.paired_verdict([(a[s] - b[s]) * 100 for s in common])
    return f"{mean:+.2f}" + ("" if np.isnan(se) else f" ± {se:.2f}") + f" {verdict}"


def table(results: list[dict]) -> tuple[str, list[dict]]:
    """The markdown tables (one per budget) and the per-budget verdicts of hawq-v3."""
    lines, verdicts = [], []
    seeds = sorted({r["seed"] for r in results})
    fp = [r for r in results if r["method"] == "float"]
    lines.append(f"full precision: {_ms(r['fake_quant'] for r in fp)} % (seeds {seeds})")
    for label in dict.fromkeys(r["budget"] for r in results if r["method"] != "float"):
        for kind in dict.fromkeys(r["kind"] for r in results if r["budget"] == label):
            rs = [r for r in results if r["budget"] == label and r["kind"] == kind]
            lines += ["", f"**{kind} budget {label}** (accuracy % mean ± std over seeds {seeds}; differences in "
                          "points, mean ± s.e. of per-seed differences)",
                      "| method | bits per layer (seed %d) | budget used | size / INT8 | PTQ | QAT fake-quant | "
                      "integer-only | vs uniform | vs random |" % seeds[0], "|---|---|---|---|---|---|---|---|---|"]
            methods = [m for m in dict.fromkeys(r["method"] for r in rs) if not m.startswith("random")] + ["random"]
            for m in methods:
                g = [r for r in rs if r["method"] == m or (m == "random" and r["method"].startswith("random"))]
                if not g:
                    continue
                first = g[0]
                name = f"random (×{len({r['method'] for r in g})})" if m == "random" else m
                lines.append(
                    f"| {name} | {first['bits'] if m != 'random' else 'various'} | "
                    f"{np.mean([r['used'] for r in g]):.1%} | {np.mean([r['size_frac'] for r in g]):.3f} | "
                    f"{_ms(r['ptq'] for r in g)} | {_ms(r['fake_quant'] for r in g)} | {_ms(r['integer'] for r in g)} | "
                    f"{_diff(rs, m, 'uniform') if m != 'uniform' else ''} | "
                    f"{_diff(rs, m, 'random') if m != 'random' else ''} |")
            verdicts.append({"budget": f"{kind} {label}", "vs_uniform": _diff(rs, "hawq-v3", "uniform"),
                             "vs_random": _diff(rs, "hawq-v3", "random")})
    return "\n".join(lines), verdicts


def _ms_ptq(rs, method) -> str:
    per = {}
    for r in rs:
        if r["method"] == method or (method == "random" and r["method"].startswith("random")):
            per.setdefault(r["seed"], []).append(r["ptq"])
    return _ms(np.mean(v) for v in per.values()) if per else "—"


def summary(results: list[dict]) -> str:
    """One row per budget: HAWQ-V3 against uniform and random, before and after QAT, and the
    largest gap between integer-only and fake-quant accuracy over every row of the budget."""
    lines = ["| budget | HAWQ-V3 PTQ | uniform PTQ | random PTQ | HAWQ-V3 QAT | uniform QAT | vs uniform | "
             "vs random | max abs(int - fq) |", "|---|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["budget"] for r in results if r["method"] != "float"):
        for kind in dict.fromkeys(r["kind"] for r in results if r["budget"] == label):
            rs = [r for r in results if r["budget"] == label and r["kind"] == kind]
            uni = [r for r in rs if r["method"] == "uniform"]
            width = ""
            if uni:
                w = sorted(set(uni[0]["bits"][1:-1]))
                width = f" (W{w[0]})" if len(w) == 1 else ""
            gap = max(abs(r["integer"] - r["fake_quant"]) for r in rs if r["integer"] is not None) * 100
            lines.append(f"| {kind} {label} | {_ms_ptq(rs, 'hawq-v3')} | {_ms_ptq(rs, 'uniform')}{width} | "
                         f"{_ms_ptq(rs, 'random')} | {_ms(r['fake_quant'] for r in rs if r['method'] == 'hawq-v3')} | "
                         f"{_ms(r['fake_quant'] for r in uni)} | {_diff(rs, 'hawq-v3', 'uniform')} | "
                         f"{_diff(rs, 'hawq-v3', 'random')} | {gap:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Accuracy against size (size budgets) and BOPS budgets per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("size", "bops") if any(r["kind"] == k for r in results)] or ["size"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds) + 0.5, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, kind in zip(axes, kinds):
        rs = [r for r in results if r["kind"] == kind and r.get("act") == 8]
        for i, m in enumerate(["uniform", *ab.METHODS]):
            xs, ys, es = [], [], []
            for label in dict.fromkeys(r["budget"] for r in rs):
                per = _by_seed([r for r in rs if r["budget"] == label], m)
                if per:
                    xs.append(float(label.lstrip("W")))
                    ys.append(np.mean(list(per.values())) * 100)
                    es.append(np.std(list(per.values())) * 100)
            if xs:
                ax.errorbar(np.array(xs) + (i - 4) * 0.012, ys, yerr=es, marker="o", ms=3, capsize=2,
                            lw=1.8 if m.startswith("hawq-v3") else 1, label=m)
        ax.set_xlabel(f"{kind} budget (uniform-equivalent weight bits, first/last at 8)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("QAT fake-quant test accuracy (%)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_parallel(args, argv, log) -> list[dict]:
    """``--jobs`` single-threaded worker processes (:func:`work`) share every seed's work, then
    this process collects the rows. One worker per core: more would only share the cores."""
    from hqjax.train import progress_bar

    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    claims = _workers.Claims(os.path.join(args.work, "claims", run_id))
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                      "intra_op_parallelism_threads=1").strip())
    # every seed and worker compiles the same programs (weights are arguments): compile each once
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.work, "jax_cache"))
    drop = {"--json", "--plot", "--jobs"}
    base, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=")[0] in drop
        if not skip:
            base.append(a)
    cmds = [[sys.executable, os.path.abspath(__file__), *base, "--worker", str(i), "--run-id", run_id]
            for i in range(args.jobs)]
    logs = [os.path.join(args.work, f"log_{_slug(args, '_')}_w{i}.txt") for i in range(args.jobs)]
    bar = progress_bar(desc="configurations evaluated", enabled=args.progress)
    _workers.run_workers(cmds, logs, env, on_poll=lambda: bar.update(claims.count_finished("cfg-") - bar.n))
    bar.close()
    log(f"{args.jobs} workers done ({claims.count_finished('cfg-')} configurations evaluated)")
    return [r for seed in args.seeds for r in run_seed(seed, args, log)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="mnist_subset")
    p.add_argument("--data-dir", default=None, help="prepared tfds folder (e.g. for cifar10)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--quick: 0)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--hessian-examples", type=int, default=256)
    p.add_argument("--eig-examples", type=int, default=96, help="analysis examples the eigenvalues are measured on")
    p.add_argument("--eig-subsets", type=int, default=3, help="Q-BERT's data subsets (of the eigenvalue examples)")
    p.add_argument("--eig-iters", type=int, default=6, help="power iterations per layer and subset")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    p.add_argument("--widths", nargs="+", type=float, default=[2.5, 2.75, 3, 3.25, 3.5],
                   help="size budgets as uniform-equivalent weight widths (first/last layer at 8)")
    p.add_argument("--bops-widths", nargs="*", type=float, default=[2.5, 2.75, 3, 3.25, 3.5])
    p.add_argument("--latency-width", type=float, default=None,
                   help="measured-latency budget (default 3; --quick: none); 0 for none")
    p.add_argument("--no-act-follows", dest="act_follows", action="store_false",
                   help="leave out the budget where activations follow weights")
    p.add_argument("--random", type=int, default=5, help="random draws per budget")
    p.add_argument("--quick", action="store_true", help="one seed (unless --seeds), one size budget, one epoch: a smoke test")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes sharing the seeds' work (one per core; 1: in turn, in this process)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hqjax_accuracy_table"))
    p.add_argument("--json", default=None, help="also write every result row to this JSON file")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-budget plot to this PNG")
    p.add_argument("--from-json", nargs="+", default=None, help="only print the tables of saved results")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.widths, args.bops_widths = args.seeds or [0], 1, [3.0], []
        args.act_follows, args.random = False, 1
        args.latency_width = args.latency_width or 0
        args.hessian_examples, args.probes, args.eig_iters = 32, 4, 3
    args.seeds = args.seeds or [0, 1, 2]
    args.latency_width = 3.0 if args.latency_width is None else args.latency_width
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.worker is not None:
        work(args, log)
        return 0
    problem = None if args.from_json else check_inputs(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    results = []
    if args.from_json:
        for path in args.from_json:
            results += _read(path)
    elif args.jobs > 1:
        if args.latency_width:
            latency_table(args)
        results = _run_parallel(args, argv if argv is not None else sys.argv[1:], log)
    else:
        for seed in args.seeds:
            results += run_seed(seed, args, log)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        _write(args.json, results)
    text, verdicts = table(results)
    print(text)
    print("\n**Summary** (accuracy % mean ± std over seeds; differences: QAT fake-quant, points, mean ± s.e., verdict)")
    print(summary(results))
    if args.plot:
        plot(results, args.plot)
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    print("key figure (hawq-v3, QAT fake-quant accuracy, points): "
          + "; ".join(f"{v['budget']}: vs uniform {v['vs_uniform']}, vs random {v['vs_random']}" for v in verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
