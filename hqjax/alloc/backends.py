"""OR-Tools backends for the multiple-choice knapsack behind bit allocation.

The program (HAWQ-V3 Eq. 12): binary ``x[g, c]`` (group ``g`` takes choice ``c``),
``sum_c x[g, c] = 1``, ``sum_{g,c} cost_k[g, c] x[g, c] <= limit_k`` for each budget ``k``,
minimize ``sum_{g,c} score[g, c] x[g, c]``.

Why the coefficients are rewritten before they reach a solver: raw costs (BOPS around
1e10-1e12) made SCIP report OPTIMAL with a 3.5% worse objective (PERF_NOTES). Each row is
shifted by its group's smallest allowed value (a constant, since exactly one choice is
taken) and divided by the largest remaining coefficient, so every coefficient is in [0, 1].
CP-SAT needs integers: the normalized coefficients are multiplied by ``2**30`` and rounded,
or kept exact when the shifted costs are already integers (sizes in bits, BOPS).
The caller checks every returned assignment against the unscaled budgets in float64.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

__all__ = ["BACKENDS", "SolveOutcome", "solve_choice_program"]

MIP_BACKENDS = ("CBC", "SCIP", "HIGHS")
BACKENDS = (*MIP_BACKENDS, "CP-SAT")
_INT_RESOLUTION = 2**30


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


def solve_choice_program(
    score: np.ndarray,
    allowed: np.ndarray,
    costs: Sequence[np.ndarray],
    limits: Sequence[float],
    *,
    backend: str = "CBC",
    time_limit: float | None = None,
) -> SolveOutcome:
    """Solve the one-hot choice program.

    Parameters
    ----------
    score : ``[G, C]`` objective coefficients (entries where ``allowed`` is False are ignored).
    allowed : ``[G, C]`` boolean mask of the choices each group may take (at least one per row).
    costs, limits : one ``[G, C]`` cost matrix and one upper limit per budget.
    backend : ``'CBC'`` (default, fastest here), ``'SCIP'``, ``'HIGHS'`` or ``'CP-SAT'``.
    time_limit : seconds; on expiry the best solution found is returned with status FEASIBLE.
    """
    backend = backend.upper()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; OR-Tools backends available: {list(BACKENDS)}")
    if not allowed.any(axis=1).all():
        raise ValueError("every group needs at least one allowed choice")
    obj, _ = _normalized(np.asarray(score, np.float64), allowed)
    rows = [_normalized(np.asarray(c, np.float64), allowed, float(l)) for c, l in zip(costs, limits)]
    if backend == "CP-SAT":
        exact = [_exact_integer_row(np.asarray(c, np.float64), allowed, float(l)) for c, l in zip(costs, limits)]
        rows = [e if e is not None else _rounded_row(a, r) for e, (a, r) in zip(exact, rows)]
        return _solve_cpsat(np.rint(obj * _INT_RESOLUTION).astype(np.int64), allowed, rows, time_limit)
    return _solve_mip(backend, obj, allowed, rows, time_limit)


def _exact_integer_row(cost, allowed, limit):
    """Shifted costs as exact int64 when they are integers that cannot overflow, else None."""
    delta, offset = _shift(cost, allowed)
    if not np.all(delta == np.rint(delta)) or delta.max(initial=0.0) * delta.shape[0] >= 2**62:
        return None
    ints = np.rint(delta).astype(np.int64)
    g = int(np.gcd.reduce(ints[ints > 0])) if (ints > 0).any() else 1
    return ints // g, int(np.floor((limit - offset) / g + 1e-9))


def _rounded_row(coef, rhs):
    return np.rint(coef * _INT_RESOLUTION).astype(np.int64), int(np.floor(rhs * _INT_RESOLUTION + 0.5))


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
