"""The allocations, budgets and statistics of the accuracy ablation (``accuracy_table.py``).

Every method answers the same question at the same budget: which weight bits per layer?

- ``hawq-v3``: the ILP with ``Tr(H_l)/n_l ||Q_b(W_l) - W_l||^2`` (HAWQ-V3 Eq. 11-12);
- ``hawq-v2``: the lowest-sensitivity point within the budget on the Pareto frontier of the
  same metric, sampled at ``frontier_points`` budgets (HAWQ-V2 Sec. 3.3);
- ``hawq-v1``: the ILP with the top eigenvalue in place of the trace, ``λ_max/n`` (HAWQ-V1
  Sec. 3.1, its ordering turned into an allocation at the budget);
- ``q-bert``: the ILP with ``|mean λ| + std λ`` over data subsets (Q-BERT Sec. 3.2);
- ``ggn`` and ``fisher``: the ILP of ``hawq-v3`` with the exact Gauss-Newton trace or the
  empirical Fisher trace in place of the Hessian trace (the cheaper proxies);
- ``reversed``: the ``hawq-v3`` ILP with the average traces handed out in reversed rank
  order (the most sensitive layer gets the fewest bits);
- ``random``: random configurations using 90-100% of the budget;
- ``uniform``: every allocated layer at one width (the widest whose cost fits).

The first and last layer stay at 8 bits in every method (HAWQ-V3's setting, ``edge_bits``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("hawq-v3", "hawq-v2", "hawq-v1", "q-bert", "ggn", "fisher", "reversed", "random")

# two-sided 95% Student t quantiles by degrees of freedom (paired differences over seeds)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclasses.dataclass(frozen=True)
class Budget:
    """One budget: ``kind`` ('size', 'bops', 'latency') at ``limit``; ``label`` names it by the
    uniform-equivalent width; ``act`` is ``8`` or ``'weights'`` (activations follow weights)."""

    label: str
    kind: str
    limit: float
    candidates: tuple[int, ...]
    act: int | str = 8


def edge_pins(names) -> dict:
    """The first and last layer at W8A8."""
    return {n: (8, 8) for n in (names[0], names[-1])}


def config_cost(costs, kind: str, names, bits: dict, act) -> float:
    return float(sum(costs.cost(kind, n, bits[n], bits[n] if act == "weights" else act) for n in names))


def uniform_bits(names, b: int) -> dict:
    return {n: (8 if n in (names[0], names[-1]) else b) for n in names}


def budget_at(costs, kind: str, names, width: float, act=8, candidates=(2, 3, 4, 8)) -> Budget:
    """The cost of uniform ``width`` bits (interpolated for a fractional width), edges at 8."""
    lo = int(math.floor(width))
    c_lo = config_cost(costs, kind, names, uniform_bits(names, lo), act)
    c_hi = config_cost(costs, kind, names, uniform_bits(names, lo + 1), act) if width > lo else c_lo
    frac = width - lo
    label = f"W{width:g}" + ("A=W" if act == "weights" else "")
    return Budget(label, kind, (1 - frac) * c_lo + frac * c_hi, tuple(candidates), act)


def widest_uniform(costs, budget: Budget, names) -> int | None:
    fits = [b for b in budget.candidates
            if config_cost(costs, budget.kind, names, uniform_bits(names, b), budget.act) <= budget.limit * (1 + 1e-9)]
    return max(fits) if fits else None


# ----------------------------------------------------------------------------- sensitivity tables
def tables(rows, ggn: dict, fisher: dict, eig_samples: dict):
    """``{method: (SensitivityTable, metric)}`` for the ILP methods, from the job's
    ``sensitivity.json`` rows and the proxy traces and eigenvalue samples of each layer."""
    from hqjax.alloc import LayerSensitivity, SensitivityTable

    def table(trace_of=None, eigen=False):
        out = {}
        for r in rows:
            n = r["layer"]
            lam = eig_samples.get(n, ())
            out[n] = LayerSensitivity(
                n_params=r["n_params"], perturbation={int(b): v for b, v in r["perturbation"].items()},
                trace=r["trace"] if trace_of is None else trace_of[n], trace_stderr=r["trace_stderr"],
                eigenvalues=(float(np.mean(lam)),) if eigen and len(lam) else (),
                eigenvalue_samples=tuple(lam) if eigen else (), weight_norm_sq=r.get("weight_norm_sq"))
        return SensitivityTable(out)

    hess, eig = table(), table(eigen=True)
    n_params = {r["layer"]: r["n_params"] for r in rows}
    avg = {n: r["trace"] / n_params[n] for n, r in zip(n_params, rows)}
    rank = sorted(avg, key=lambda n: -avg[n])
    # the i-th most sensitive layer gets the i-th least sensitive layer's average trace
    swapped = {n: avg[rank[-1 - i]] * n_params[n] for i, n in enumerate(rank)}
    return {"hawq-v3": (hess, "hawq_v3"), "hawq-v2": (hess, "hawq_v2"), "hawq-v1": (eig, "hawq_v1"),
            "q-bert": (eig, "qbert"), "ggn": (table(ggn), "hawq_v3"), "fisher": (table(fisher), "hawq_v3"),
            "reversed": (table(swapped), "hawq_v3")}


def _solve(table, metric, costs, budget: Budget, names, limit=None):
    from hqjax.alloc import allocate

    a = allocate(table, costs, {budget.kind: (budget.limit if limit is None else limit) * (1 + 1e-9)},
                 candidates=budget.candidates, metric=metric,
                 act_candidates="weights" if budget.act == "weights" else (budget.act,),
                 fixed=edge_pins(names))
    return {n: a.weight_bits[n] for n in names}, a.objective


def frontier_pick(table, metric, costs, budget: Budget, names, points: int = 32) -> dict:
    """HAWQ-V2's choice: the frontier of (cost, summed sensitivity) sampled at ``points``
    budgets from all-lowest to all-highest bits; the lowest-sensitivity point within budget."""
    lo = config_cost(costs, budget.kind, names, uniform_bits(names, min(budget.candidates)), budget.act)
    hi = config_cost(costs, budget.kind, names, uniform_bits(names, max(budget.candidates)), budget.act)
    # with measured latencies the all-lowest configuration need not be the cheapest, so every
    # sampled point may lie above a budget that is still feasible: then the budget is the point
    limits = [float(x) for x in np.linspace(lo, hi, points) if x <= budget.limit * (1 + 1e-9)] or [budget.limit]
    best = None
    for limit in limits:
        bits, obj = _solve(table, metric, costs, budget, names, limit=limit)
        if best is None or obj < best[1]:
            best = (bits, obj)
    return best[0]


def random_bits(costs, budget: Budget, names, rng, fill: float = 0.9, max_moves: int = 10_000) -> dict:
    """A random configuration using ``fill``-100% of the budget: uniform random bits per
    allocated layer, then random single-layer steps down (over budget) or up (under
    ``fill``) until the cost is inside the band."""
    cands = sorted(budget.candidates)
    free = names[1:-1]
    bits = {n: 8 if n in (names[0], names[-1]) else int(rng.choice(cands)) for n in names}
    for _ in range(max_moves):
        c = config_cost(costs, budget.kind, names, bits, budget.act)
        if fill * budget.limit <= c <= budget.limit * (1 + 1e-9):
            return bits
        up = c < fill * budget.limit
        movable = [n for n in free if (bits[n] < cands[-1] if up else bits[n] > cands[0])]
        if not movable:
            break
        n = movable[rng.integers(len(movable))]
        step = cands.index(bits[n]) + (1 if up else -1)
        trial = dict(bits, **{n: cands[step]})
        if up and config_cost(costs, budget.kind, names, trial, budget.act) > budget.limit * (1 + 1e-9):
            # the step overshoots: accept it only when nothing smaller can reach the band
            if all(config_cost(costs, budget.kind, names, dict(bits, **{m: cands[cands.index(bits[m]) + 1]}),
                               budget.act) > budget.limit * (1 + 1e-9) for m in movable):
                break
            continue
        bits = trial
    raise ValueError(f"no random configuration within {fill:.0%}-100% of {budget.label} {budget.kind}")


def allocations(method_tables, costs, budget: Budget, names, rng, n_random: int) -> dict[str, dict]:
    """``{label: {layer: bits}}`` of every method at ``budget`` (``random #k`` for the draws)."""
    out = {}
    u = widest_uniform(costs, budget, names)
    if u is not None:
        out["uniform"] = uniform_bits(names, u)
    for m, (table, metric) in method_tables.items():
        out[m] = (frontier_pick if m == "hawq-v2" else lambda *a: _solve(*a)[0])(table, metric, costs, budget, names)
    for k in range(n_random):
        out[f"random #{k}"] = random_bits(costs, budget, names, rng)
    return out


def bit_config(bits: dict, act) -> dict:
    return {n: {"weight_bits": int(b), "act_bits": int(b) if act == "weights" else int(act)} for n, b in bits.items()}


# ----------------------------------------------------------------------------- eigenvalues
def layer_eigenvalue_samples(model_fn, params, blk, x, y, key, *, subsets: int = 3, iters: int = 12) -> dict:
    """Each layer's top Hessian eigenvalue on ``subsets`` disjoint parts of ``(x, y)``
    (Q-BERT Sec. 3.2's samples; their mean is HAWQ-V1's λ_max), by power iteration on the
    layer's diagonal Hessian block ``M H M`` (``M`` the layer's mask). The mask is an argument
    of the one compiled step, so every layer and subset reuses it (a vmap over layers would
    batch the convolution kernels' tangents, which XLA:CPU runs far slower)."""
    from hqjax.tree import tree_random_like

    def loss(p, xb, yb):
        logits = model_fn(p, xb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    def masked(v, m):
        return jax.tree.map(lambda a, b: a * b, v, m)

    def normalized(v):
        return jax.tree.map(lambda a: a / jnp.sqrt(sum(jnp.vdot(b, b) for b in jax.tree.leaves(v))), v)

    @jax.jit
    def step(v, m, xb, yb):
        hv = masked(jax.jvp(jax.grad(lambda p: loss(p, xb, yb)), (params,), (masked(v, m),))[1], m)
        lam = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv)))
        return normalized(hv), lam

    out = {}
    for i, name in enumerate(blk.names):
        m = jax.tree.map(lambda a, b: jnp.broadcast_to(b, a.shape).astype(a.dtype), params, blk.mask(name))
        v0 = normalized(masked(tree_random_like(jax.random.fold_in(key, i), params, "gaussian"), m))
        out[name] = []
        for xb, yb in zip(np.array_split(np.asarray(x), subsets), np.array_split(np.asarray(y), subsets)):
            v = v0
            for _ in range(iters):
                v, lam = step(v, m, xb, yb)
            out[name].append(float(lam))
    return out


# ----------------------------------------------------------------------------- statistics
def paired_verdict(diffs) -> tuple[float, float, str]:
    """Mean and standard error of per-seed differences and the verdict: ``win``/``loss`` when
    the 95% t-interval of the mean excludes 0, else ``tie``."""
    d = np.asarray(diffs, float)
    if d.size < 2:
        return float(d.mean()), float("nan"), "n/a (one seed)"
    se = d.std(ddof=1) / math.sqrt(d.size)
    half = _T95.get(d.size - 1, 1.96) * se
    verdict = "win" if d.mean() - half > 0 else "loss" if d.mean() + half < 0 else "tie"
    return float(d.mean()), float(se), verdict
