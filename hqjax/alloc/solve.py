"""Bit allocation as an integer program (HAWQ-V3 Sec. 3.4, Eq. 12) solved with OR-Tools.

Each layer takes exactly one choice of (weight bits, activation bits) from the candidates;
the summed sensitivity is minimized subject to any combination of model-size, BOPS and
latency budgets. Layers may be fixed (first and last at 8 bits) or tied (a residual block's
downsample conv shares the bits of its main branch, as in HAWQ-V3's ResNet configs).
The result is a BitConfig, ``{layer: {"weight_bits": w, "act_bits": a}}``.

This is host-side code: it runs after the curvature estimates, outside any ``jit``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import flax.struct
import numpy as np

from hqjax._schema import unstamp
from hqjax._bits import DEFAULT_ACT_BITS
from hqjax.alloc._json import dump_json
from hqjax.alloc._backends import solve_choice_program
from hqjax.alloc.sensitivity import SensitivityTable, get_metric, sensitivity_scores

__all__ = ["Alpha", "alpha", "Allocation", "InfeasibleBudgetError", "allocate", "FOLLOW_WEIGHTS"]

FOLLOW_WEIGHTS = "weights"  # act_candidates value: activation bits equal to weight bits

_REL_TOL = 1e-9  # float64 slack when checking a solution against a budget
logger = logging.getLogger("hqjax")


@dataclasses.dataclass(frozen=True)
class Alpha:
    """A budget given as a fraction: ``cost(all lowest) + value * (cost(all highest) - cost(all lowest))``."""

    value: float

    def __post_init__(self):
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] (0: every layer at its lowest bits, 1: highest); got {self.value}")


def alpha(value: float) -> Alpha:
    """HAWQ-V3's α: a budget between all-lowest (0) and all-highest (1) bits."""
    return Alpha(float(value))


@flax.struct.dataclass
class Allocation:
    """The allocator's answer.

    Attributes
    ----------
    bit_config : ``{layer: {"weight_bits": w, "act_bits": a}}`` (plain JSON, the BitConfig).
    objective : summed sensitivity of the assignment (in the metric's units).
    costs : total cost under each budget, ``{kind: value}``.
    limits : the absolute limit each budget resolved to, ``{kind: value}``.
    status : ``'OPTIMAL'`` (proven) or ``'FEASIBLE'`` (time limit hit; best found).
    proven_optimal : ``status == 'OPTIMAL'``.
    solve_time_s : the solver's wall time.
    backend : the OR-Tools backend that solved it.
    metric : name of the sensitivity metric (or ``'scores'`` for a precomputed table).
    """

    bit_config: dict = flax.struct.field(pytree_node=False)
    objective: float = flax.struct.field(pytree_node=False)
    costs: dict = flax.struct.field(pytree_node=False)
    limits: dict = flax.struct.field(pytree_node=False)
    status: str = flax.struct.field(pytree_node=False)
    proven_optimal: bool = flax.struct.field(pytree_node=False)
    solve_time_s: float = flax.struct.field(pytree_node=False)
    backend: str = flax.struct.field(pytree_node=False)
    metric: str = flax.struct.field(pytree_node=False)

    @property
    def weight_bits(self) -> dict[str, int]:
        return {n: c["weight_bits"] for n, c in self.bit_config.items()}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self, path: str | None = None) -> str:
        return dump_json(self.to_dict(), path, kind="allocation")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Allocation":
        """From :meth:`to_dict` or the parsed :meth:`to_json` (whose schema stamp is checked)."""
        return cls(**unstamp(d, "allocation", "the allocation"))


class InfeasibleBudgetError(ValueError):
    """No assignment meets the budgets.

    Attributes
    ----------
    limits : the absolute limits asked for, ``{kind: value}``.
    minimal : the smallest value each budget can take on its own (fixed layers and ties held).
    minimal_with_others : the smallest value of each budget while the other budgets hold
        (None where the other budgets cannot hold together).
    """

    def __init__(self, limits, minimal, minimal_with_others):
        self.limits, self.minimal, self.minimal_with_others = limits, minimal, minimal_with_others
        lines = []
        for k, lim in limits.items():
            other = minimal_with_others.get(k)
            also = f"; {other:.6g} with the other budgets held" if other is not None and len(limits) > 1 else ""
            flag = "  <- too small" if lim < minimal[k] * (1 - _REL_TOL) or (other is not None and lim < other * (1 - _REL_TOL)) else ""
            lines.append(f"  {k}: asked {lim:.6g}, smallest feasible {minimal[k]:.6g}{also}{flag}")
        super().__init__("no bit assignment meets the budgets:\n" + "\n".join(lines) + "\nraise the budgets above these values")


# ----------------------------------------------------------------------------- assembly
def _choice_pairs(candidates, act_candidates) -> list[tuple[int, int]]:
    if not candidates:
        raise ValueError("candidates is empty; pass the allowed weight bit widths, e.g. (2, 3, 4, 8)")
    cands = sorted({int(b) for b in candidates})
    if isinstance(act_candidates, str):
        if act_candidates != FOLLOW_WEIGHTS:
            raise ValueError(f"act_candidates={act_candidates!r}: pass activation bit widths, e.g. (8,), "
                             f"or {FOLLOW_WEIGHTS!r} for activations that follow the weights")
        return [(b, b) for b in cands]  # W4A4, W8A8 as in HAWQ-V3's ILP
    if act_candidates is None or not len(act_candidates):
        raise ValueError(f"act_candidates={act_candidates!r}: pass activation bit widths, e.g. (8,) (the default), "
                         f"or {FOLLOW_WEIGHTS!r} for activations that follow the weights")
    return [(w, a) for w in cands for a in sorted({int(b) for b in act_candidates})]


def _as_pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, Mapping):
        return int(value["weight_bits"]), int(value.get("act_bits", value["weight_bits"]))
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    raise TypeError(f"fixed bits for layer {name!r} must be an int, a (w, a) pair or a BitConfig entry; got {value!r}")


def _scores(table, bits, metric) -> tuple[dict[str, dict[int, float]], str]:
    if isinstance(table, SensitivityTable):
        name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
        get_metric(metric)
        return sensitivity_scores(table, bits, metric), name
    out = {}
    for layer, row in table.items():
        row = {int(b): float(v) for b, v in row.items()}
        missing = [b for b in bits if b not in row]
        if missing:
            raise KeyError(f"layer {layer!r} has no score for bits {missing}; it has {sorted(row)}")
        out[layer] = row
    return out, "scores"


def _act_scores(table, act_bits) -> dict[str, dict[int, float]]:
    # HAWQ-V2 Sec. 3.3: activation sensitivity = Tr(H_act) * ||Q_b(a) - a||^2 when measured.
    out = {}
    if isinstance(table, SensitivityTable):
        for name, row in table.rows.items():
            if row.act_trace is not None and row.act_perturbation:
                out[name] = {a: row.act_trace * float(row.act_perturbation[a]) for a in act_bits}
    return out


def _groups(layers: list[str], ties) -> list[list[str]]:
    parent = {n: n for n in layers}

    def find(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for tie in ties:
        for n in tie:
            if n not in parent:
                raise KeyError(f"tied layer {n!r} is not in the program; layers are {layers}")
        for n in tie[1:]:
            parent[find(n)] = find(tie[0])
    by_root: dict[str, list[str]] = {}
    for n in layers:
        by_root.setdefault(find(n), []).append(n)
    return list(by_root.values())


def _cost_matrix(costs, kind, layers, choices) -> np.ndarray:
    if hasattr(costs, "matrix"):
        return np.asarray(costs.matrix(kind, layers, choices), np.float64)
    return np.array([[float(costs.cost(kind, n, w, a)) for (w, a) in choices] for n in layers], np.float64)


@dataclasses.dataclass(frozen=True)
class _Program:
    """The choice program over tie groups: ``score`` / ``costs[kind]`` / ``allowed`` are ``[G, C]``."""

    layers: list[str]
    groups: list[list[str]]
    choices: list[tuple[int, int]]
    score: np.ndarray
    allowed: np.ndarray
    costs: dict[str, np.ndarray]
    metric: str


def _build_program(table, costs, kinds, candidates, metric, act_candidates, fixed, ties) -> _Program:
    fixed = dict(fixed or {})
    free = _choice_pairs(candidates, act_candidates)
    choices = list(free)
    fixed_pairs = {n: _as_pair(n, v) for n, v in fixed.items()}
    choices += sorted({p for p in fixed_pairs.values() if p not in free})
    scores, metric_name = _scores(table, sorted({w for w, _ in choices}), metric)
    act = _act_scores(table, sorted({a for _, a in choices})) if not isinstance(act_candidates, str) else {}
    layers = list(scores) + [n for n in fixed if n not in scores]
    if not layers:
        raise ValueError("the sensitivity table has no layers, so there is nothing to allocate bits to; build it "
                         "from params with kernel/embedding layers (hqjax.sensitivity_table(params, bits, ...)), "
                         "for an NNX model from nnx.split(model, nnx.Param, ...)[1]")
    known = set(getattr(costs, "names", layers))
    for n in layers:
        if n not in known:
            raise KeyError(f"layer {n!r} has no costs; costs cover {sorted(known)[:8]}...")
    free = set(free)
    score_l = np.array([[scores.get(n, {}).get(w, 0.0) + act.get(n, {}).get(a, 0.0) for w, a in choices] for n in layers])
    allowed_l = np.array([[(c == fixed_pairs[n]) if n in fixed_pairs else (c in free) for c in choices] for n in layers])
    groups = _groups(layers, ties)
    index = {n: i for i, n in enumerate(layers)}
    members = [[index[n] for n in g] for g in groups]
    allowed = np.array([allowed_l[m].all(axis=0) for m in members])
    for g, ok in zip(groups, allowed):
        if not ok.any():
            pins = {n: fixed_pairs[n] for n in g if n in fixed_pairs}
            raise ValueError(f"tied layers {g} are fixed to different bits {pins}; fix them alike or untie them")
    cost_l = {k: _cost_matrix(costs, k, layers, choices) for k in kinds}
    return _Program(
        layers=layers,
        groups=groups,
        choices=choices,
        score=np.array([score_l[m].sum(axis=0) for m in members]),
        allowed=allowed,
        costs={k: np.array([cost_l[k][m].sum(axis=0) for m in members]) for k in kinds},
        metric=metric_name,
    )


# ----------------------------------------------------------------------------- allocate
def allocate(
    table,
    costs,
    budget: Mapping[str, float | Alpha],
    candidates: Sequence[int] = (2, 3, 4, 8),
    *,
    metric="hawq_v3",
    act_candidates: Sequence[int] | str = (DEFAULT_ACT_BITS,),
    fixed: Mapping[str, Any] | None = None,
    ties: Sequence[Sequence[str]] = (),
    backend: str = "CBC",
    time_limit: float | None = None,
    reduce: bool = True,
) -> Allocation:
    """The bit configuration of least summed sensitivity within the budgets (HAWQ-V3 Eq. 12).

    Parameters
    ----------
    table : a :class:`SensitivityTable` (scored by ``metric``) or precomputed scores
        ``{layer: {bits: score}}``.
    costs : a :class:`hqjax.LayerCosts` (anything with ``cost(kind, layer, w_bits, a_bits)``)
        covering every layer in the program.
    budget : ``{kind: limit}`` with kinds ``'size'`` (bytes), ``'bops'``, ``'latency'``
        (microseconds); a limit is absolute or ``hqjax.alpha(x)`` (HAWQ-V3's fraction
        between all-lowest and all-highest bits). An empty budget gives all-highest bits.
    candidates : weight bit widths each free layer may take.
    metric : registered metric name or ``fn(row, bits)``; used when ``table`` is a table.
    act_candidates : activation bit widths each free layer may take. The default ``(8,)``
        keeps every activation at 8 bits (the policy of ``hqjax run`` and
        ``python -m hqjax.alloc`` too); several values choose activation bits per layer,
        scored by the table's ``act_trace * act_perturbation[a]`` where present (HAWQ-V2
        Sec. 3.3), else 0; ``'weights'`` makes activation bits follow the weight bits (W4A4,
        W8A8, as in HAWQ-V3's ILP).
    fixed : ``{layer: bits | (w, a)}`` (an int ``b`` means W=b and A=b); a fixed layer not in ``table`` joins the program
        with zero sensitivity (its cost still counts).
    ties : groups of layers that must take the same choice.
    backend : ``'CBC'``, ``'SCIP'``, ``'HIGHS'`` or ``'CP-SAT'``.
    time_limit : seconds; on expiry the best solution is returned with ``proven_optimal=False``.
    reduce : drop the choices the LP relaxation's bound excludes before the backend runs
        (exact; see ``backends._reduce_by_lp_bound``). False hands the whole program over.

    Raises
    ------
    InfeasibleBudgetError : with the smallest feasible value of each budget.
    """
    prog = _build_program(table, costs, list(budget), candidates, metric, act_candidates, fixed, ties)
    cost_g, allowed, kinds = prog.costs, prog.allowed, list(budget)
    limits = {k: _resolve_limit(budget[k], cost_g[k], allowed, prog.choices) for k in kinds}
    minimal = {k: float(np.where(allowed, cost_g[k], np.inf).min(axis=1).sum()) for k in kinds}
    if any(limits[k] < minimal[k] * (1 - _REL_TOL) for k in kinds):
        raise InfeasibleBudgetError(limits, minimal, _minimal_with_others(cost_g, allowed, limits, backend))

    out = _solve_checked(prog.score, allowed, cost_g, limits, backend, time_limit, reduce)
    if out.choice is None:
        if out.status == "INFEASIBLE":
            raise InfeasibleBudgetError(limits, minimal, _minimal_with_others(cost_g, allowed, limits, backend))
        raise TimeoutError(f"{backend} found no feasible assignment within time_limit={time_limit} s; allow more time")
    if out.status != "OPTIMAL":
        logger.warning("%s stopped at time_limit=%s s with a feasible assignment not proven optimal; "
                       "allow more time for a proof", backend, time_limit)
    pick = {n: prog.choices[c] for g, c in zip(prog.groups, out.choice) for n in g}
    bit_config = {n: {"weight_bits": pick[n][0], "act_bits": pick[n][1]} for n in prog.layers}
    rows = np.arange(len(prog.groups))
    return Allocation(
        bit_config=bit_config,
        objective=float(prog.score[rows, out.choice].sum()),
        costs={k: float(cost_g[k][rows, out.choice].sum()) for k in kinds},
        limits=limits,
        status=out.status,
        proven_optimal=out.status == "OPTIMAL",
        solve_time_s=out.time_s,
        backend=backend.upper(),
        metric=prog.metric,
    )


def _resolve_limit(value, cost, allowed, choices) -> float:
    if isinstance(value, Alpha):
        order = sorted(range(len(choices)), key=lambda c: choices[c])
        lo_c = [next(c for c in order if ok[c]) for ok in allowed]
        hi_c = [next(c for c in reversed(order) if ok[c]) for ok in allowed]
        rows = np.arange(len(allowed))
        lo, hi = float(cost[rows, lo_c].sum()), float(cost[rows, hi_c].sum())
        return lo + value.value * (hi - lo)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"a budget limit must be finite, got {value}; leave the budget out to drop it")
    return value


def _solve_checked(score, allowed, cost_g, limits, backend, time_limit, reduce=True):
    """Solve, then check the answer against the unscaled budgets in float64.

    A MIP solver's feasibility tolerance (~1e-7 of the scaled row) can admit an assignment
    that overshoots a budget by a hair; when that happens the row is tightened by the
    overshoot and the program solved again.
    """
    kinds = list(limits)
    eff = dict(limits)
    for _ in range(4):
        out = solve_choice_program(score, allowed, [cost_g[k] for k in kinds], [eff[k] for k in kinds],
                                   backend=backend, time_limit=time_limit, reduce=reduce)
        if out.choice is None:
            return out
        rows = np.arange(len(allowed))
        over = {k: float(cost_g[k][rows, out.choice].sum()) - limits[k] for k in kinds}
        bad = {k: v for k, v in over.items() if v > _REL_TOL * max(abs(limits[k]), 1.0)}
        if not bad:
            return out
        logger.debug("%s answer over the budgets by %s (solver tolerance); tightening and solving again", backend, bad)
        for k, v in bad.items():
            eff[k] = eff[k] - 2 * v
    raise RuntimeError(f"{backend} kept returning assignments over the budgets {bad}; try backend='CP-SAT'")


def _minimal_with_others(cost_g, allowed, limits, backend) -> dict[str, float | None]:
    out = {}
    for k in limits:
        others = [j for j in limits if j != k]
        if not others:
            out[k] = float(np.where(allowed, cost_g[k], np.inf).min(axis=1).sum())
            continue
        res = _solve_checked(cost_g[k], allowed, {j: cost_g[j] for j in others}, {j: limits[j] for j in others}, backend, None)
        rows = np.arange(len(allowed))
        out[k] = None if res.choice is None else float(cost_g[k][rows, res.choice].sum())
    return out
