"""OR-Tools backends for the multiple-choice knapsack behind bit allocation.

The program (HAWQ-V3 Eq. 12): binary ``x[g, c]`` (group ``g`` takes choice ``c``),
``sum_c x[g, c] = 1``, ``sum_{g,c} cost_k[g, c] x[g, c] <= limit_k`` for each budget ``k``,
minimize ``sum_{g,c} score[g, c] x[g, c]``.

Why the coefficients are rewritten before they reach a solver: raw costs (BOPS around
1e10-1e12) made SCIP report OPTIMAL with a worse objective. Each row is
shifted by its group's smallest allowed value (a constant, since exactly one choice is
taken) and divided by the largest remaining coefficient, so every constraint coefficient is
in [0, 1]; the objective is scaled up instead (see ``_objective``).
CP-SAT needs integers: costs are kept exact when ``2**k`` times the shifted costs are
integers (sizes in bits, BOPS), otherwise the normalized coefficients are multiplied by
``2**30`` and rounded; the objective by ``2**40``.
The caller checks every returned assignment against the unscaled budgets in float64.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

__all__ = ["BACKENDS", "SolveOutcome", "solve_choice_program"]

MIP_BACKENDS = ("CBC", "SCIP", "HIGHS")  # HIGHS runs through MathOpt, the others pywraplp
BACKENDS = (*MIP_BACKENDS, "CP-SAT")
_INT_RESOLUTION = 2**30
_OBJ_RESOLUTION = 2**40
_OBJ_RANGE = 1e9
logger = logging.getLogger("hqjax")


@dataclasses.dataclass(frozen=True)
class SolveOutcome:
    """What a backend returned: the chosen column per group (None unless a solution exists)."""

    choice: np.ndarray | None
    status: str  # OPTIMAL | FEASIBLE | INFEASIBLE | NOT_SOLVED
    time_s: float


def _shift(values: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, float]:
    """Subtract each row's smallest allowed value; return the rows and the summed offset."""
    base = np.where(allowed, values, np.inf).min(axis=1)
    return np.where(allowed, values - base[:, None], 0.0), float(base.sum())


def _normalized(values: np.ndarray, allowed: np.ndarray, limit: float | None = None):
    delta, offset = _shift(values, allowed)
    scale = float(delta.max()) if delta.size and delta.max() > 0 else 1.0
    rhs = None if limit is None else (limit - offset) / scale
    return delta / scale, rhs


def _objective(score: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Shifted scores scaled so the largest possible objective is ``_OBJ_RANGE``.

    MIP solvers stop once the gap falls under an absolute tolerance (~1e-6): with scores
    normalized to [0, 1], CBC and HiGHS reported OPTIMAL 5e-5 above the optimum on a
    1,000-layer instance. On this scale that tolerance is 1e-15 of the objective's range.
    """
    delta, _ = _shift(score, allowed)
    span = float(delta.max(axis=1).sum()) if delta.size else 0.0
    return delta * (_OBJ_RANGE / span) if span > 0 else delta


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)  # the C library's buffered stdout, where printf waits
    except (OSError, AttributeError):  # no C library to reach (not POSIX): nothing buffered there
        pass


@contextlib.contextmanager
def _native_output_to_log(backend: str):
    """Send what the solver's native code prints to the process's stdout to the ``hqjax``
    logger (DEBUG, visible with ``-v``) instead.

    Every backend is asked to be quiet (``SuppressOutput``, ``enable_output=False``,
    CP-SAT's silent default), but HiGHS's MIP solver still ``printf``s lines such as
    ``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();`` regardless
    of its ``output_flag``; only redirecting file descriptor 1 for the duration of the
    solve keeps them out of a command's output. Python-level ``sys.stdout`` is untouched.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no usable fd 1 (embedded interpreters): leave it alone
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    logger.debug("%s: %s", backend, line.rstrip())


def solve_choice_program(
    score: np.ndarray,
    allowed: np.ndarray,
    costs: Sequence[np.ndarray],
    limits: Sequence[float],
    *,
    backend: str = "CBC",
    time_limit: float | None = None,
    reduce: bool = True,
) -> SolveOutcome:
    """Solve the one-hot choice program.

    Parameters
    ----------
    score : ``[G, C]`` objective coefficients (entries where ``allowed`` is False are ignored).
    allowed : ``[G, C]`` boolean mask of the choices each group may take (at least one per row).
    costs, limits : one ``[G, C]`` cost matrix and one upper limit per budget.
    backend : ``'CBC'`` (default, fastest here), ``'SCIP'``, ``'HIGHS'`` or ``'CP-SAT'``.
    time_limit : seconds; on expiry the best solution found is returned with status FEASIBLE.
    reduce : first drop the choices that the LP relaxation's bound proves cannot beat a
        rounded LP solution (reduced-cost fixing, exact); the backend solves what is left.
    """
    t0 = time.perf_counter()
    backend = backend.upper()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; OR-Tools backends available: {list(BACKENDS)}")
    if not allowed.any(axis=1).all():
        raise ValueError("every group needs at least one allowed choice")
    obj = _objective(np.asarray(score, np.float64), allowed)
    rows = [_normalized(np.asarray(c, np.float64), allowed, float(l)) for c, l in zip(costs, limits)]
    incumbent = None
    if reduce and allowed.sum() > allowed.shape[0]:
        reduced = _reduce_by_lp_bound(obj, allowed, rows)
        if reduced is not None:
            keep, incumbent = reduced
            if (keep.sum(axis=1) == 1).all():  # the bound proves the rounded LP optimum optimal
                return SolveOutcome(incumbent, "OPTIMAL", time.perf_counter() - t0)
            allowed = keep
    with _native_output_to_log(backend):
        if backend == "CP-SAT":
            exact = [_exact_integer_row(np.asarray(c, np.float64), allowed, float(l)) for c, l in zip(costs, limits)]
            rows = [e if e is not None else _rounded_row(a, r) for e, (a, r) in zip(exact, rows)]
            obj_int = np.rint(obj / max(float(obj.max(initial=0.0)), 1e-300) * _OBJ_RESOLUTION).astype(np.int64)
            out = _solve_cpsat(obj_int, allowed, rows, time_limit)
        elif backend == "HIGHS":
            out = _solve_highs(obj, allowed, rows, time_limit)
        else:
            out = _solve_mip(backend, obj, allowed, rows, time_limit)
    if incumbent is not None and out.status != "OPTIMAL":
        # Time ran out: the LP rounding is a feasible answer too; return the better one.
        rowsel = np.arange(len(incumbent))
        if out.choice is None or obj[rowsel, incumbent].sum() < obj[rowsel, out.choice].sum():
            out = SolveOutcome(incumbent, "FEASIBLE", out.time_s)
    return dataclasses.replace(out, time_s=time.perf_counter() - t0)


def _reduce_by_lp_bound(obj, allowed, rows):
    """Reduced-cost fixing from the LP relaxation (Nemhauser & Wolsey 1988, Sec. II.6.2).

    For any multipliers ``u`` (one per group) and ``λ <= 0`` (one per budget), with reduced
    costs ``d = obj - u - Σ_k λ_k a_k``, every feasible one-hot ``x`` satisfies
    ``obj·x >= Σu + Σ_k λ_k rhs_k + Σ_g d[g, c_g]``. So choice ``(g, c)`` can only appear in a
    solution of objective at least ``LB0 - min_c d[g] + d[g, c]``; when that exceeds the
    objective of a feasible rounding of the LP optimum, the choice is dropped. The bound is
    valid for whatever duals GLOP returns (it is recomputed here in float64), so the
    reduction is exact; it leaves the backend a core of a few groups with near-tied choices.

    Returns ``(keep mask, incumbent choice)`` or None when no feasible rounding was found.
    """
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:
        return None
    G, C = allowed.shape
    idx = [(g, c) for g in range(G) for c in np.flatnonzero(allowed[g])]
    # No upper bound: x <= 1 follows from the group rows, and a bound would carry its own
    # multiplier, leaving the row duals without the reduced-cost property used below.
    xs = [solver.NumVar(0.0, solver.infinity(), "") for _ in idx]
    ones = [solver.Constraint(1.0, 1.0) for _ in range(G)]
    for (g, c), v in zip(idx, xs):
        ones[g].SetCoefficient(v, 1.0)
    cts = []
    for coef, rhs in rows:
        ct = solver.Constraint(-solver.infinity(), rhs)
        for (g, c), v in zip(idx, xs):
            if coef[g, c] != 0.0:
                ct.SetCoefficient(v, float(coef[g, c]))
        cts.append(ct)
    objective = solver.Objective()
    for (g, c), v in zip(idx, xs):
        objective.SetCoefficient(v, float(obj[g, c]))
    objective.SetMinimization()
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return None
    x = np.zeros((G, C))
    for (g, c), v in zip(idx, xs):
        x[g, c] = v.solution_value()
    u = np.array([ct.dual_value() for ct in ones])
    lam = np.minimum(np.array([ct.dual_value() for ct in cts]), 0.0)
    d = obj - u[:, None] - sum((l * coef for l, (coef, _) in zip(lam, rows)), np.zeros_like(obj))
    d = np.where(allowed, d, np.inf)
    m = d.min(axis=1)
    lb0 = float(u.sum() + sum(l * rhs for l, (_, rhs) in zip(lam, rows)) + m.sum())
    incumbent = _round_lp(x, obj, allowed, rows)
    if incumbent is None:
        return None
    z = float(obj[np.arange(G), incumbent].sum())
    slack = 1e-9 * (_OBJ_RANGE + abs(z))  # float64 summation error is far below this
    keep = allowed & (lb0 - m[:, None] + d <= z + slack)
    keep[np.arange(G), incumbent] = True
    return keep, incumbent


def _round_lp(x, obj, allowed, rows):
    """A feasible one-hot rounding of an LP solution, or None."""
    G = x.shape[0]
    base = np.where(allowed, x, -1.0).argmax(axis=1)
    frac = np.flatnonzero(x.max(axis=1) < 1 - 1e-6)
    weight = sum(coef for coef, _ in rows) if rows else np.zeros_like(x)
    tries = [base.copy()]
    for k in range(len(rows) + 1):  # cheapest support choice by all budgets, then by each one
        pick = base.copy()
        w = weight if k == len(rows) else rows[k][0]
        for g in frac:
            support = np.flatnonzero((x[g] > 1e-9) & allowed[g])
            pick[g] = support[np.argmin(w[g, support])]
        tries.append(pick)
        pick = base.copy()
        for g in frac:  # cheapest allowed choice overall
            cands = np.flatnonzero(allowed[g])
            pick[g] = cands[np.argmin(w[g, cands])]
        tries.append(pick)
    rowsel = np.arange(G)
    # Strictly inside: an incumbent over a budget by a rounding error would give a bound
    # below the true optimum and drop choices the optimum needs.
    limits = [rhs - 1e-12 * max(1.0, abs(rhs)) for _, rhs in rows]
    best = None
    for pick in tries:
        if all(coef[rowsel, pick].sum() <= lim for (coef, _), lim in zip(rows, limits)):
            pick = _improve(obj, allowed, rows, limits, pick)
            if best is None or obj[rowsel, pick].sum() < obj[rowsel, best].sum():
                best = pick
    return best


def _improve(obj, allowed, rows, limits, pick, max_moves: int = 64):
    """Greedy: switch the one choice that lowers the objective most while every budget holds."""
    G = len(pick)
    rowsel = np.arange(G)
    for _ in range(max_moves):
        gain = np.where(allowed, obj[rowsel, pick][:, None] - obj, -np.inf)
        for (coef, _), lim in zip(rows, limits):
            slack = lim - coef[rowsel, pick].sum()
            gain = np.where(coef - coef[rowsel, pick][:, None] <= slack, gain, -np.inf)
        g, c = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[g, c] > 0:
            break
        pick = pick.copy()
        pick[g] = c
    return pick


def _exact_integer_row(cost, allowed, limit):
    """Shifted costs as exact int64 when ``cost * 2**k`` is integral for a small ``k`` (sizes
    of ``n * b / 8`` bytes, BOPS) and cannot overflow, else None."""
    delta, offset = _shift(cost, allowed)
    for k in range(0, 17):
        scaled = delta * 2.0**k
        if scaled.max(initial=0.0) * max(delta.shape[0], 1) >= 2**62:
            return None
        if np.all(scaled == np.rint(scaled)):
            ints = np.rint(scaled).astype(np.int64)
            g = int(np.gcd.reduce(ints[ints > 0])) if (ints > 0).any() else 1
            return ints // g, int(np.floor((limit - offset) * 2.0**k / g + 1e-9))
    return None


def _rounded_row(coef, rhs):
    # Rounding moves each term by at most half a unit, so widening the limit by one unit per
    # group keeps every truly feasible assignment; the caller rejects the rare overshoot.
    return np.rint(coef * _INT_RESOLUTION).astype(np.int64), int(np.floor(rhs * _INT_RESOLUTION)) + coef.shape[0]


def _solve_mip(backend, obj, allowed, rows, time_limit) -> SolveOutcome:
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise RuntimeError(f"OR-Tools in this environment cannot create the {backend} solver; try 'CP-SAT'")
    solver.SuppressOutput()
    G, C = allowed.shape
    var = {}
    for g in range(G):
        one = solver.Constraint(1.0, 1.0)
        for c in np.flatnonzero(allowed[g]):
            var[g, c] = solver.BoolVar("")
            one.SetCoefficient(var[g, c], 1.0)
    for coef, rhs in rows:
        ct = solver.Constraint(-solver.infinity(), rhs)
        for (g, c), v in var.items():
            if coef[g, c] != 0.0:
                ct.SetCoefficient(v, float(coef[g, c]))
    objective = solver.Objective()
    for (g, c), v in var.items():
        if obj[g, c] != 0.0:
            objective.SetCoefficient(v, float(obj[g, c]))
    objective.SetMinimization()
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)
    if time_limit is not None:
        solver.SetTimeLimit(max(1, int(time_limit * 1000)))
    t0 = time.perf_counter()
    status = solver.Solve(params)
    elapsed = time.perf_counter() - t0
    name = {
        pywraplp.Solver.OPTIMAL: "OPTIMAL",
        pywraplp.Solver.FEASIBLE: "FEASIBLE",
        pywraplp.Solver.INFEASIBLE: "INFEASIBLE",
    }.get(status, "NOT_SOLVED")
    if name not in ("OPTIMAL", "FEASIBLE"):
        return SolveOutcome(None, name, elapsed)
    values = np.full((G, C), -1.0)
    for (g, c), v in var.items():
        values[g, c] = v.solution_value()
    return SolveOutcome(values.argmax(axis=1), name, elapsed)


def _solve_highs(obj, allowed, rows, time_limit) -> SolveOutcome:
    """HiGHS through MathOpt: OR-Tools 9.15's pywraplp HiGHS interface ignores the relative
    MIP gap (``SetRelativeMipGap`` is a no-op), so it stopped at HiGHS's default 1e-4 and
    reported OPTIMAL 6.7e-5 above the optimum on a 1,000-layer instance."""
    import datetime

    from ortools.math_opt.python import mathopt

    model = mathopt.Model()
    G, C = allowed.shape
    var = {}
    for g in range(G):
        one = model.add_linear_constraint(lb=1.0, ub=1.0)
        for c in np.flatnonzero(allowed[g]):
            var[g, c] = model.add_binary_variable()
            one.set_coefficient(var[g, c], 1.0)
    for coef, rhs in rows:
        ct = model.add_linear_constraint(ub=float(rhs))
        for (g, c), v in var.items():
            if coef[g, c] != 0.0:
                ct.set_coefficient(v, float(coef[g, c]))
    for (g, c), v in var.items():
        if obj[g, c] != 0.0:
            model.objective.set_linear_coefficient(v, float(obj[g, c]))
    model.objective.is_maximize = False
    params = mathopt.SolveParameters(relative_gap_tolerance=0.0, absolute_gap_tolerance=0.0, enable_output=False)
    if time_limit is not None:
        params.time_limit = datetime.timedelta(seconds=float(time_limit))
    t0 = time.perf_counter()
    result = mathopt.solve(model, mathopt.SolverType.HIGHS, params=params)
    elapsed = time.perf_counter() - t0
    reason = result.termination.reason
    if reason == mathopt.TerminationReason.OPTIMAL:
        name = "OPTIMAL"
    elif reason in (mathopt.TerminationReason.INFEASIBLE, mathopt.TerminationReason.INFEASIBLE_OR_UNBOUNDED):
        return SolveOutcome(None, "INFEASIBLE", elapsed)
    elif result.has_primal_feasible_solution():
        name = "FEASIBLE"
    else:
        return SolveOutcome(None, "NOT_SOLVED", elapsed)
    values = result.variable_values()
    choice = np.zeros(G, np.int64)
    best = np.full(G, -1.0)
    for (g, c), v in var.items():
        if values[v] > best[g]:
            best[g], choice[g] = values[v], c
    return SolveOutcome(choice, name, elapsed)


def _solve_cpsat(obj, allowed, rows, time_limit) -> SolveOutcome:
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    G, C = allowed.shape
    var = {}
    for g in range(G):
        here = []
        for c in np.flatnonzero(allowed[g]):
            var[g, c] = model.new_bool_var("")
            here.append(var[g, c])
        model.add_exactly_one(here)
    keys = list(var)
    bools = [var[k] for k in keys]
    for coef, rhs in rows:
        model.add(cp_model.LinearExpr.weighted_sum(bools, [int(coef[k]) for k in keys]) <= rhs)
    model.minimize(cp_model.LinearExpr.weighted_sum(bools, [int(obj[k]) for k in keys]))
    solver = cp_model.CpSolver()
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    t0 = time.perf_counter()
    status = solver.solve(model)
    elapsed = time.perf_counter() - t0
    name = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE", cp_model.INFEASIBLE: "INFEASIBLE"}.get(
        status, "NOT_SOLVED"
    )
    if name not in ("OPTIMAL", "FEASIBLE"):
        return SolveOutcome(None, name, elapsed)
    choice = np.zeros(G, np.int64)
    for (g, c), v in var.items():
        if solver.boolean_value(v):
            choice[g] = c
    return SolveOutcome(choice, name, elapsed)
