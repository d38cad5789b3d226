"""benchmarks/accuracy_table.py and its allocations (benchmarks/_ablation.py)."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _ablation as ab  # noqa: E402

from hqjax.alloc import LayerCosts  # noqa: E402

NAMES = ["first", "a", "b", "c", "d", "last"]


def _costs():
    rng = np.random.default_rng(0)
    n = {k: int(v) for k, v in zip(NAMES, rng.integers(50, 2000, len(NAMES)))}
    macs = {k: int(v) for k, v in zip(NAMES, rng.integers(1_000, 90_000, len(NAMES)))}
    return LayerCosts(n_weights=n, macs=macs)


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    c = _costs()
    return [{"layer": n, "n_params": c.n_weights[n], "trace": float(rng.uniform(0.1, 50)), "trace_stderr": 0.0,
             "perturbation": {str(b): float(c.n_weights[n] * 4.0 ** -b * rng.uniform(0.5, 2)) for b in (2, 3, 4, 8)},
             "weight_norm_sq": 1.0} for n in NAMES]


def _brute(scores, costs, budget):
    best = None
    for combo in itertools.product(budget.candidates, repeat=len(NAMES) - 2):
        bits = dict(zip(NAMES, (8, *combo, 8)))
        if ab.config_cost(costs, budget.kind, NAMES, bits, budget.act) <= budget.limit * (1 + 1e-9):
            s = sum(scores(n, bits[n]) for n in NAMES)
            if best is None or s < best[0] - 1e-12:
                best = (s, bits)
    return best[1]


@pytest.mark.parametrize("kind,width,act", [("size", 2.5, 8), ("bops", 3.25, 8), ("bops", 5.0, "weights")])
def test_every_ilp_method_is_the_brute_force_optimum_of_its_scores_with_edges_at_8(kind, width, act):
    costs, rows = _costs(), _rows()
    eig = {n: [float(i + 1), float(i + 2), float(i + 4)] for i, n in enumerate(NAMES)}
    tables = ab.tables(rows, {r["layer"]: 2 * r["trace"] for r in rows}, {r["layer"]: 1.0 for r in rows}, eig)
    cands = (2, 3, 4, 8) if act == 8 else (4, 8)
    budget = ab.budget_at(costs, kind, NAMES, width, act, candidates=cands)
    allocs = ab.allocations(tables, costs, budget, NAMES, np.random.default_rng(0), n_random=3)
    from hqjax.alloc import get_metric

    for m in ("hawq-v3", "hawq-v1", "q-bert", "ggn", "fisher", "reversed"):
        table, metric = tables[m]
        fn = get_metric(metric)
        want = _brute(lambda n, b: fn(table[n], b), costs, budget)
        assert allocs[m] == want, m
    # HAWQ-V2's frontier pick is a feasible point no better than the optimum
    v2 = allocs["hawq-v2"]
    fn = get_metric("hawq_v2")
    score = lambda bits: sum(fn(tables["hawq-v2"][0][n], bits[n]) for n in NAMES)
    assert ab.config_cost(costs, kind, NAMES, v2, act) <= budget.limit * (1 + 1e-9)
    assert score(v2) >= score(allocs["hawq-v3"]) - 1e-9
    # reversed: the layer with the largest average trace gets the smallest one
    avg = {r["layer"]: r["trace"] / r["n_params"] for r in rows}
    rev = tables["reversed"][0]
    top, bottom = max(avg, key=avg.get), min(avg, key=avg.get)
    assert rev[top].trace / rev[top].n_params == pytest.approx(avg[bottom])
    for k in range(3):
        bits = allocs[f"random #{k}"]
        used = ab.config_cost(costs, kind, NAMES, bits, act) / budget.limit
        assert 0.9 <= used <= 1 + 1e-9 and bits["first"] == bits["last"] == 8
    assert allocs["uniform"] == ab.uniform_bits(NAMES, max(b for b in cands if b <= width))


def test_hawq_v2_pick_when_measured_latencies_make_the_lowest_bits_the_slowest():
    """Timing noise can make 2-bit layers slower than 3-bit ones: a uniform-3-bit latency
    budget then lies below every sampled frontier point, and HAWQ-V2 solves at the budget."""
    costs = _costs().with_latency({n: {2: 12.0, 3: 10.0, 4: 11.0, 8: 20.0} for n in NAMES})
    rows = _rows()
    tables = ab.tables(rows, {r["layer"]: 2 * r["trace"] for r in rows}, {r["layer"]: 1.0 for r in rows},
                       {n: [1.0] for n in NAMES})
    budget = ab.budget_at(costs, "latency", NAMES, 3.0)
    table, metric = tables["hawq-v2"]
    bits = ab.frontier_pick(table, metric, costs, budget, NAMES)
    assert ab.config_cost(costs, "latency", NAMES, bits, 8) <= budget.limit * (1 + 1e-9)
    assert bits == {n: (8 if n in ("first", "last") else 3) for n in NAMES}  # the only point within budget


def test_random_draws_differ_and_fail_clearly_when_the_band_is_empty():
    costs = _costs()
    budget = ab.budget_at(costs, "size", NAMES, 3.0)
    rng = np.random.default_rng(1)
    draws = {tuple(ab.random_bits(costs, budget, NAMES, rng).values()) for _ in range(20)}
    assert len(draws) > 5
    tight = ab.Budget("W2", "size", ab.config_cost(costs, "size", NAMES, ab.uniform_bits(NAMES, 2), 8) * 0.99,
                      (2, 3, 4, 8))
    with pytest.raises(ValueError, match="no random configuration"):
        ab.random_bits(costs, tight, NAMES, rng)


def test_paired_verdict():
    assert ab.paired_verdict([1.0, 1.2, 0.9])[2] == "win"
    assert ab.paired_verdict([-1.0, -1.2, -0.9])[2] == "loss"
    assert ab.paired_verdict([1.0, -1.0, 0.1])[2] == "tie"
    mean, se, _ = ab.paired_verdict([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and se == pytest.approx(np.std([1, 2, 3], ddof=1) / np.sqrt(3))


def test_eigenvalue_samples_match_eigh_of_each_diagonal_block():
    import jax
    import jax.numpy as jnp

    from hqjax import blocks

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(24, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 24))
    params = {"h": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) * 0.7},
              "o": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) * 0.7}}
    model_fn = lambda p, xb: jnp.tanh(xb @ p["h"]["kernel"]) @ p["o"]["kernel"]  # noqa: E731
    blk = blocks(params)
    got = ab.layer_eigenvalue_samples(model_fn, params, blk, x, y, jax.random.PRNGKey(0), subsets=2, iters=300)
    compared = 0
    for name in ("h", "o"):
        for i, (xb, yb) in enumerate(zip(np.array_split(np.asarray(x), 2), np.array_split(np.asarray(y), 2))):
            def loss_b(k):
                p = {**params, name: {"kernel": k.reshape(params[name]["kernel"].shape)}}
                logits = model_fn(p, xb)
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))
            h = jax.hessian(loss_b)(params[name]["kernel"].reshape(-1))
            ev = np.linalg.eigvalsh(np.asarray(h, np.float64))
            mags = np.sort(np.abs(ev))
            if mags[-1] < 1.1 * mags[-2]:
                continue  # power iteration cannot separate two eigenvalues of almost equal magnitude
            top = ev[np.argmax(np.abs(ev))]  # power iteration finds the largest magnitude
            assert got[name][i] == pytest.approx(top, rel=1e-3), (name, i)
            compared += 1
    assert compared >= 3


def _claim_all(args):
    import _workers

    folder, names = args
    return [n for n in names if _workers.Claims(folder).take(n)]


def test_claims_give_each_unit_to_exactly_one_process(tmp_path):
    import multiprocessing

    import _workers

    names = [f"cfg-s{i % 3}-{i}/a8" for i in range(60)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        got = pool.map(_claim_all, [(str(tmp_path), names[::1 if k % 2 else -1]) for k in range(4)])
    taken = [n for g in got for n in g]
    assert sorted(taken) == sorted(names)  # every unit once, none twice
    c = _workers.Claims(str(tmp_path))
    assert not c.take(names[0]) and not c.finished(names[0])
    c.finish(names[0])
    assert c.finished(names[0]) and c.count_finished("cfg-") == 1


def _run(tmp_path, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accuracy_table.py"), "--quick",
                           "--model", "cnn", "--dataset", "digits", "--work", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quick_mode_in_two_workers_evaluates_each_configuration_once_and_resumes(tmp_path):
    out = tmp_path / "rows.json"
    p = _run(tmp_path, "--seeds", "0", "1", "--jobs", "2", "--json", str(out), "--plot", str(tmp_path / "plot.png"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["seed"] for r in rows} == {0, 1}
    methods = {r["method"] for r in rows}
    assert {"float", "uniform", "hawq-v3", "hawq-v2", "hawq-v1", "q-bert", "ggn", "fisher", "reversed"} <= methods
    for r in rows:
        if r["method"] != "float":
            assert 0 <= r["fake_quant"] <= 1 and 0 <= r["integer"] <= 1 and r["bits"][0] == r["bits"][-1] == "8"
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert p.stdout.strip().splitlines()[-1].startswith("key figure")
    # each configuration evaluated by exactly one worker: the workers' results files are disjoint
    seed1 = tmp_path / "work" / "cnn-digits-s1"
    files = {f.name: json.loads(f.read_text()) for f in seed1.glob("ablation_results*.json")}
    keys = [k for d in files.values() for k in d]
    assert len(keys) == len(set(keys)) == len({r["bits"] for r in rows if r["seed"] == 1 and r["method"] != "float"})
    # a rerun in one process evaluates only what is missing, to the same accuracies
    name, lost = max(files.items(), key=lambda kv: len(kv[1]))
    (seed1 / name).unlink()
    p = _run(tmp_path, "--seeds", "0", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seed 0: 0 configurations evaluated" in p.stdout
    assert f"seed 1: {len(lost)} configurations evaluated" in p.stdout
    again = json.loads((seed1 / "ablation_results.json").read_text())
    for key, acc in lost.items():
        assert {k: again[key][k] for k in ("ptq", "fake_quant", "integer")} == \
            {k: acc[k] for k in ("ptq", "fake_quant", "integer")}, key


def _run_user(tmp_path, model, *extra):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accuracy_table.py"), "--quick",
                           "--model", model, "--dataset", "digits", "--work", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("model, layers, budgets", [
    # Linen with BatchNorm, ReLU6, a depthwise convolution and average pooling; with the latency budget
    ("user_models:MobileBlockNet", 5, {"size W3", "latency W3"}),
    ("user_models:nnx_cnn", 3, {"size W3"}),  # NNX, trained from the factory's initialisation
])
def test_quick_mode_on_user_models_the_package_never_saw(tmp_path, model, layers, budgets):
    out = tmp_path / "rows.json"
    extra = ["--latency-width", "3"] if "latency W3" in budgets else []
    p = _run_user(tmp_path, model, "--json", str(out), *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in json.loads(out.read_text()) if r["method"] != "float"]
    assert {f"{r['kind']} {r['budget']}" for r in rows} == budgets
    assert {"uniform", "hawq-v3", "hawq-v2", "hawq-v1", "q-bert", "ggn", "fisher", "reversed"} <= \
        {r["method"] for r in rows}
    for r in rows:
        assert len(r["bits"]) == layers and r["bits"][0] == r["bits"][-1] == "8"
        assert r["used"] <= 1 + 1e-9
        # the integer program derived from the user's model computes what its fake-quant model does
        assert abs(r["integer"] - r["fake_quant"]) <= 0.02, r


def test_bad_model_or_widths_fail_in_one_line_before_any_work(tmp_path):
    for model, extra, message in [("nopkg.nets:factory", [], "cannot import module 'nopkg.nets'"),
                                  ("user_models:nnx_cnn", ["--bits", "1", "8"], "widths are integers from 2 to 8"),
                                  ("user_models:nnx_cnn", ["--jobs", "0"], "at least 1 worker")]:
        p = _run_user(tmp_path, model, *extra)
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "work").exists()
