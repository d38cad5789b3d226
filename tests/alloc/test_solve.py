"""The allocator against brute force, across OR-Tools backends, and against HAWQ-V3's published configs."""

import functools
import itertools
import json
import os

import numpy as np
import pytest

import hqjax
from hqjax.alloc.solve import InfeasibleBudgetError

DATA = os.path.join(os.path.dirname(__file__), "data")

# The brute-force references enumerate W=A pairs (HAWQ-V3's ILP), so activations follow the
# weights here; the default, 8-bit activations, has its own test below.
_allocate = functools.partial(hqjax.allocate, act_candidates="weights")


# ----------------------------------------------------------------------------- brute force
def random_instance(rng, max_layers=6, act=False):
    L = int(rng.integers(2, max_layers + 1))
    cands = sorted(rng.choice([2, 3, 4, 8], size=int(rng.integers(2, 5)), replace=False).tolist())
    layers = [f"l{i}" for i in range(L)]
    # BOPS-scale coefficients (1e10-1e12 per layer) on purpose: unscaled, they fooled SCIP.
    costs = hqjax.LayerCosts(
        n_weights={n: int(rng.integers(1_000, 10_000_000)) for n in layers},
        macs={n: int(rng.integers(100_000_000, 50_000_000_000)) for n in layers},
    )
    scores = {}
    for n in layers:
        t = float(rng.lognormal(0, 2))
        scores[n] = {b: t * float(rng.uniform(0.5, 1.5)) * 4.0 ** (-b) for b in cands}
    fixed, ties = {}, []
    if rng.random() < 0.35:
        fixed[layers[int(rng.integers(L))]] = int(rng.choice(cands))
    if rng.random() < 0.5 and L >= 3:
        i, j = rng.choice(L, size=2, replace=False)
        ties.append([layers[i], layers[j]])
    return layers, cands, costs, scores, fixed, ties


def enumerate_configs(layers, cands, costs, scores, fixed, ties, kinds):
    """Every assignment that respects fixed layers and ties, with its objective and costs."""
    out = []
    for assign in itertools.product(cands, repeat=len(layers)):
        cfg = dict(zip(layers, assign))
        if any(cfg[n] != b for n, b in fixed.items() if n in cfg):
            continue
        if any(len({cfg[n] for n in t}) > 1 for t in ties):
            continue
        obj = sum(scores[n][cfg[n]] for n in layers)
        cost = {k: sum(costs.cost(k, n, cfg[n], cfg[n]) for n in layers) for k in kinds}
        out.append((obj, cost, cfg))
    return out


def check_solution(res, layers, costs, scores, fixed, ties, limits):
    cfg = res.weight_bits
    assert set(cfg) == set(layers)
    for n, b in fixed.items():
        assert cfg[n] == b
    for t in ties:
        assert len({cfg[n] for n in t}) == 1
    for k, lim in limits.items():
        total = sum(costs.cost(k, n, cfg[n], cfg[n]) for n in layers)
        assert total <= lim * (1 + 1e-12), (k, total, lim)
        assert total == pytest.approx(res.costs[k], rel=1e-12)
    assert res.objective == pytest.approx(sum(scores[n][cfg[n]] for n in layers), rel=1e-12)


def run_random_against_brute_force(seed, backend, n_instances, reduce=True):
    rng = np.random.default_rng(seed)
    checked_binding = 0
    for _ in range(n_instances):
        layers, cands, costs, scores, fixed, ties = random_instance(rng)
        kinds = ("size", "bops")
        configs = enumerate_configs(layers, cands, costs, scores, fixed, ties, kinds)
        # Limits drawn from the achievable costs so budgets bind (and sometimes sit exactly on a config).
        limits = {}
        for k in kinds:
            vals = sorted(c[1][k] for c in configs)
            limits[k] = float(vals[int(rng.integers(len(vals)))]) if rng.random() < 0.5 else float(rng.uniform(vals[0], vals[-1]))
        feasible = [c for c in configs if all(c[1][k] <= limits[k] for k in kinds)]
        if not feasible:
            with pytest.raises(InfeasibleBudgetError):
                _allocate(scores, costs, limits, cands, fixed=fixed, ties=ties, backend=backend, reduce=reduce)
            continue
        best = min(c[0] for c in feasible)
        res = _allocate(scores, costs, limits, cands, fixed=fixed, ties=ties, backend=backend, reduce=reduce)
        assert res.proven_optimal and res.status == "OPTIMAL"
        check_solution(res, layers, costs, scores, fixed, ties, limits)
        assert res.objective == pytest.approx(best, rel=1e-9), (backend, res.objective, best)
        checked_binding += best > min(c[0] for c in configs) * (1 + 1e-9)
    assert checked_binding > n_instances // 5  # the budgets really did bind in many instances


@pytest.mark.parametrize("reduce", [True, False])
def test_cbc_equals_brute_force_on_random_instances(reduce):
    run_random_against_brute_force(0, "CBC", 60, reduce)


@pytest.mark.parametrize("backend", ["SCIP", "HIGHS", "CP-SAT"])
def test_other_backends_equal_brute_force(backend):
    # The whole program goes to the backend, so the backend's own answer is what is checked.
    run_random_against_brute_force(1, backend, 20, reduce=False)


def test_two_backends_give_the_same_answer():
    rng = np.random.default_rng(2)
    for _ in range(15):
        layers, cands, costs, scores, fixed, ties = random_instance(rng, max_layers=30)
        budget = {"size": hqjax.alpha(rng.uniform(0.1, 0.9)), "bops": hqjax.alpha(rng.uniform(0.1, 0.9))}
        a = _allocate(scores, costs, budget, cands, fixed=fixed, ties=ties, backend="CBC", reduce=False)
        b = _allocate(scores, costs, budget, cands, fixed=fixed, ties=ties, backend="CP-SAT", reduce=False)
        c = _allocate(scores, costs, budget, cands, fixed=fixed, ties=ties, backend="HIGHS")
        assert a.objective == pytest.approx(c.objective, rel=1e-7)
        assert a.objective == pytest.approx(b.objective, rel=1e-7)
        assert a.limits == b.limits


def test_activation_bits_chosen_per_layer_equal_brute_force():
    rng = np.random.default_rng(3)
    layers = [f"l{i}" for i in range(4)]
    w_c, a_c = (2, 4, 8), (4, 8)
    table = hqjax.SensitivityTable({
        n: hqjax.LayerSensitivity(
            n_params=100, trace=float(rng.uniform(1, 10)),
            perturbation={b: float(rng.uniform(0.5, 1.5)) * 4.0 ** -b for b in w_c},
            act_trace=float(rng.uniform(1, 10)),
            act_perturbation={a: float(rng.uniform(0.5, 1.5)) * 4.0 ** -a for a in a_c},
        ) for n in layers
    })
    costs = hqjax.LayerCosts({n: int(rng.integers(100, 1000)) for n in layers}, {n: int(rng.integers(10**6, 10**8)) for n in layers})
    limit = {"bops": 0.4 * sum(costs.bops(n, 8, 8) for n in layers), "size": 0.6 * sum(costs.size_bytes(n, 8) for n in layers)}
    res = _allocate(table, costs, limit, w_c, act_candidates=a_c, metric="hawq_v3")
    best = np.inf
    for pairs in itertools.product(itertools.product(w_c, a_c), repeat=len(layers)):
        if sum(costs.bops(n, w, a) for n, (w, a) in zip(layers, pairs)) > limit["bops"]:
            continue
        if sum(costs.size_bytes(n, w) for n, (w, a) in zip(layers, pairs)) > limit["size"]:
            continue
        r = [table[n] for n in layers]
        best = min(best, sum(x.trace / x.n_params * x.perturbation[w] + x.act_trace * x.act_perturbation[a] for x, (w, a) in zip(r, pairs)))
    assert res.objective == pytest.approx(best, rel=1e-9)
    assert len({c["act_bits"] for c in res.bit_config.values()} | {c["weight_bits"] for c in res.bit_config.values()}) > 1
    got = sum(costs.bops(n, c["weight_bits"], c["act_bits"]) for n, c in res.bit_config.items())
    assert got <= limit["bops"]


# ----------------------------------------------------------------------------- budgets
def test_infeasible_budget_reports_the_smallest_feasible_values():
    rng = np.random.default_rng(4)
    for _ in range(10):
        layers, cands, costs, scores, fixed, ties = random_instance(rng)
        configs = enumerate_configs(layers, cands, costs, scores, fixed, ties, ("size", "bops"))
        min_size = min(c[1]["size"] for c in configs)
        bops_limit = float(np.median([c[1]["bops"] for c in configs]))
        min_size_given_bops = min(c[1]["size"] for c in configs if c[1]["bops"] <= bops_limit)
        with pytest.raises(InfeasibleBudgetError) as err:
            _allocate(scores, costs, {"size": min_size * 0.999, "bops": bops_limit}, cands, fixed=fixed, ties=ties)
        assert err.value.minimal["size"] == pytest.approx(min_size, rel=1e-12)
        assert err.value.minimal_with_others["size"] == pytest.approx(min_size_given_bops, rel=1e-12)
        assert f"{min_size:.6g}" in str(err.value)
        # Asking exactly for the reported minimum works.
        res = _allocate(scores, costs, {"size": err.value.minimal_with_others["size"], "bops": bops_limit},
                             cands, fixed=fixed, ties=ties)
        assert res.costs["size"] <= err.value.minimal_with_others["size"] * (1 + 1e-12)


def test_jointly_infeasible_budgets_are_reported_with_the_others_held():
    # Layer a has no fast 4-bit kernel: small size wants a at 4 bits, low latency wants it at 8.
    costs = hqjax.LayerCosts({"a": 100, "b": 1}, {"a": 1, "b": 100},
                             latency_us={"a": {4: 10.0, 8: 1.0}, "b": {4: 1.0, 8: 1.0}})
    scores = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    for budget in ({"size": 60.0}, {"latency": 5.0}):
        _allocate(scores, costs, budget, (4, 8))  # each alone is feasible
    with pytest.raises(InfeasibleBudgetError) as err:
        _allocate(scores, costs, {"size": 60.0, "latency": 5.0}, (4, 8))
    # sizes: a 50 / 100 B, b 0.5 / 1 B; latencies: a 10 / 1 us, b 1 / 1 us.
    assert err.value.minimal == {"size": 50.5, "latency": 2.0}
    assert err.value.minimal_with_others == {"size": 100.5, "latency": 11.0}
    assert "100.5" in str(err.value) and "11" in str(err.value)


def test_alpha_zero_and_one_give_all_lowest_and_all_highest():
    rng = np.random.default_rng(5)
    layers, cands, costs, scores, _, _ = random_instance(rng)
    lo = _allocate(scores, costs, {"size": hqjax.alpha(0.0)}, cands)
    hi = _allocate(scores, costs, {"bops": hqjax.alpha(1.0)}, cands)
    assert set(lo.weight_bits.values()) == {min(cands)}
    assert set(hi.weight_bits.values()) == {max(cands)}  # scores fall with bits
    with pytest.raises(ValueError, match="alpha"):
        hqjax.alpha(1.5)


def test_time_limit_returns_a_feasible_solution_flagged_by_status():
    rng = np.random.default_rng(6)
    layers = [f"l{i}" for i in range(800)]
    costs = hqjax.LayerCosts({n: int(rng.integers(10**3, 10**6)) for n in layers}, {n: int(rng.integers(10**6, 10**9)) for n in layers},
                             latency_us={n: {b: float(rng.uniform(1, 10)) * b for b in (2, 3, 4, 8)} for n in layers})
    scores = {n: {b: float(rng.lognormal()) * 4.0 ** -b for b in (2, 3, 4, 8)} for n in layers}
    budget = {"size": hqjax.alpha(0.37), "bops": hqjax.alpha(0.41), "latency": hqjax.alpha(0.3)}
    # 1 ms is too short for CP-SAT to find anything; the LP rounding is returned instead.
    res = _allocate(scores, costs, budget, (2, 3, 4, 8), backend="CP-SAT", time_limit=0.001)
    assert res.status == "FEASIBLE" and not res.proven_optimal
    best = _allocate(scores, costs, budget, (2, 3, 4, 8), backend="CBC")
    assert best.proven_optimal and best.objective <= res.objective
    for r in (res, best):
        for k in budget:
            assert r.costs[k] <= r.limits[k] * (1 + 1e-12)
    with pytest.raises(TimeoutError, match="time_limit"):  # without the LP rounding: nothing found
        _allocate(scores, costs, budget, (2, 3, 4, 8), backend="CP-SAT", time_limit=0.001, reduce=False)


def test_bad_inputs_raise_naming_the_problem():
    costs = hqjax.LayerCosts({"a": 10, "b": 10}, {"a": 1, "b": 1})
    scores = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    with pytest.raises(ValueError, match="flops"):
        _allocate(scores, costs, {"flops": 1.0}, (4, 8))
    with pytest.raises(ValueError, match="fixed to different bits"):
        _allocate(scores, costs, {}, (4, 8), fixed={"a": 4, "b": 8}, ties=[["a", "b"]])
    with pytest.raises(KeyError, match="'c'"):
        _allocate(scores, costs, {}, (4, 8), fixed={"c": 8})
    with pytest.raises(KeyError, match="bits \\[2\\]"):
        _allocate(scores, costs, {}, (2, 4))
    with pytest.raises(ValueError, match="backend"):
        _allocate(scores, costs, {}, (4, 8), backend="GUROBI")


def test_allocation_round_trips_through_json():
    costs = hqjax.LayerCosts({"a": 10, "b": 20}, {"a": 1, "b": 1})
    res = _allocate({"a": {4: 1.0, 8: 0.0}, "b": {4: 3.0, 8: 0.0}}, costs, {"size": hqjax.alpha(0.5)}, (4, 8))
    back = hqjax.Allocation.from_dict(json.loads(res.to_json()))
    assert back == res
    # Sizes a: 5 / 10 B, b: 10 / 20 B; alpha 0.5 -> 22.5 B, so only one layer fits at 8 bits.
    assert res.bit_config == {"a": {"weight_bits": 8, "act_bits": 8}, "b": {"weight_bits": 4, "act_bits": 4}}


# ----------------------------------------------------------------------------- HAWQ-V3 reference
def _reference():
    with open(os.path.join(DATA, "hawq_v3_resnet18_ilp.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("backend", ["CBC", "CP-SAT"])
def test_reproduces_hawq_v3_resnet18_configs(backend):
    """HAWQ-V3's ResNet-18 ILP inputs and shipped configs.

    Source: Zhen-Dong/HAWQ (MIT license), commit 1616df69fdd99f100a8d8a6e78742e0a89292634,
    ILP.ipynb (inputs) and bit_config.py (bit_config_resnet18_{modelsize,bops,latency}_*).
    Their notebook's objective is the average trace (trace / n) times ||Q(W)-W||^2, our
    'hawq_v3' metric (HAWQ-V3 Eq. 12); activations follow weights (W4A4 / W8A8), as
    BOPS = MACs * b * b. The total-trace ablation ('total_trace') must miss some of them.
    """
    d = _reference()
    L = d["layers"]
    costs = hqjax.LayerCosts(
        n_weights=dict(zip(L, d["parameters"])),
        macs=dict(zip(L, d["macs"])),
        latency_us={n: {b: d["latency_ms_t4"][b][i] * 1000 for b in ("4", "8")} for i, n in enumerate(L)},
    )
    table = hqjax.SensitivityTable({
        n: hqjax.LayerSensitivity(
            n_params=d["parameters"][i],
            trace=d["average_hessian_trace"][i] * d["parameters"][i],
            perturbation={int(b): d["weight_perturbation_sq"][b][i] for b in ("4", "8")},
        ) for i, n in enumerate(L)
    })
    kinds = {"model_size": "size", "bops": "bops", "latency": "latency"}
    for key, expected in d["expected"].items():
        kind, a = key.split("@")
        res = _allocate(table, costs, {kinds[kind]: hqjax.alpha(float(a))}, d["candidate_bits"],
                             metric="hawq_v3", ties=d["ties"], backend=backend)
        assert res.weight_bits == expected, key
        assert res.proven_optimal
    missed = [key for key, expected in d["expected"].items()
              if _allocate(table, costs, {kinds[key.split("@")[0]]: hqjax.alpha(float(key.split("@")[1]))},
                                d["candidate_bits"], metric="total_trace", ties=d["ties"], backend=backend).weight_bits
              != expected]
    assert missed, "the total-trace metric should not reproduce HAWQ-V3's configurations"


def test_backends_agree_exactly_on_a_few_hundred_layers():
    """Heterogeneous sensitivities (a lognormal spread of traces) over 400 layers and 3 budgets.

    With the objective normalized to [0, 1], CBC and HiGHS stopped on their absolute gap
    tolerance and reported OPTIMAL above the optimum on instances like this one, and
    pywraplp's HiGHS ignored the relative gap; every backend must now find the same optimum.
    """
    rng = np.random.default_rng(7)
    L, bits = 400, (2, 3, 4, 8)
    names = [f"l{i}" for i in range(L)]
    n = rng.integers(10**3, 10**6, size=L)
    macs = n * rng.integers(49, 3136, size=L)
    lat = {names[i]: {b: float(macs[i] * 1e-6 * (0.3 + 0.7 * b / 8) * rng.uniform(0.9, 1.1)) for b in bits} for i in range(L)}
    costs = hqjax.LayerCosts(dict(zip(names, n.tolist())), dict(zip(names, macs.tolist())), latency_us=lat)
    t = rng.lognormal(0, 2, size=L)
    scores = {names[i]: {b: float(t[i] * n[i] * rng.uniform(0.8, 1.2) * 4.0 ** -b) for b in bits} for i in range(L)}
    budget = {"size": hqjax.alpha(0.37), "bops": hqjax.alpha(0.41), "latency": hqjax.alpha(0.45)}
    ref = _allocate(scores, costs, budget, bits, backend="CP-SAT", reduce=False)  # integer objective
    for backend, reduce in (("CBC", False), ("HIGHS", False), ("CBC", True), ("SCIP", True)):
        res = _allocate(scores, costs, budget, bits, backend=backend, reduce=reduce)
        assert res.proven_optimal
        assert res.objective == pytest.approx(ref.objective, rel=1e-10), (backend, reduce)


def test_activations_default_to_8_bits_and_follow_weights_only_when_asked():
    costs = hqjax.LayerCosts(n_weights={"a": 10, "b": 10}, macs={"a": 100, "b": 100})
    scores = {"a": {4: 1.0, 8: 0.0}, "b": {4: 3.0, 8: 0.0}}
    budget = {"size": hqjax.alpha(0.5)}
    default = hqjax.allocate(scores, costs, budget, (4, 8))
    assert {c["act_bits"] for c in default.bit_config.values()} == {8}
    follow = hqjax.allocate(scores, costs, budget, (4, 8), act_candidates="weights")
    assert all(c["act_bits"] == c["weight_bits"] for c in follow.bit_config.values())
    # BOPs see the difference: W4A8 costs twice W4A4
    assert default.costs["size"] == follow.costs["size"]
    assert costs.bops("a", 4, 8) == 2 * costs.bops("a", 4, 4)
    with pytest.raises(ValueError, match="'weights'"):
        hqjax.allocate(scores, costs, budget, (4, 8), act_candidates="follow")


def test_empty_table_is_a_clear_value_error():
    costs = hqjax.LayerCosts({"a": 10}, {"a": 1})
    with pytest.raises(ValueError, match="sensitivity table has no layers"):
        hqjax.allocate(hqjax.SensitivityTable({}), costs, {"size": hqjax.alpha(0.5)}, (4, 8))
    with pytest.raises(ValueError, match="sensitivity table has no layers"):
        hqjax.allocate({}, costs, {"size": 100.0}, (4, 8))
