"""HAWQ-V2's Pareto frontier: least total sensitivity against model size (or BOPS, latency).

Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization", NeurIPS 2020, Sec. 3.2
and Fig. 2: every bit configuration is a point (cost, Σ_i Tr(H_i)/n_i ||Q(W_i) - W_i||^2);
the frontier is the lower envelope, and the configuration chosen for a budget is the
frontier point at that cost. Each point here is one solve of :func:`hqjax.allocate` at a
budget swept from all-lowest to all-highest bits, so every point is proven optimal.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import flax.struct
import numpy as np

from hqjax._bits import DEFAULT_ACT_BITS
from hqjax.alloc._json import dump_json
from hqjax.alloc.solve import Alpha, allocate, alpha

__all__ = ["ParetoFrontier", "pareto_frontier", "plot_pareto"]


@flax.struct.dataclass
class ParetoFrontier:
    """Points of least sensitivity at increasing cost.

    Attributes
    ----------
    kind : the swept budget (``'size'``, ``'bops'`` or ``'latency'``).
    costs : achieved cost of each frontier point, increasing.
    objectives : total sensitivity of each point, decreasing.
    bit_configs : each point's BitConfig.
    chosen : index of the point chosen for ``budget`` (None when no budget was given).
    budget : the absolute limit the chosen point was solved for (None without a budget).
    uniform : ``{bits: (cost, objective)}`` of every layer at the same candidate bits.
    metric : the sensitivity metric's name.
    """

    kind: str = flax.struct.field(pytree_node=False)
    costs: tuple = flax.struct.field(pytree_node=False)
    objectives: tuple = flax.struct.field(pytree_node=False)
    bit_configs: tuple = flax.struct.field(pytree_node=False)
    chosen: int | None = flax.struct.field(pytree_node=False)
    budget: float | None = flax.struct.field(pytree_node=False)
    uniform: dict = flax.struct.field(pytree_node=False)
    metric: str = flax.struct.field(pytree_node=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["costs"], d["objectives"], d["bit_configs"] = list(self.costs), list(self.objectives), list(self.bit_configs)
        d["uniform"] = {str(b): list(v) for b, v in self.uniform.items()}
        return d

    def to_json(self, path: str | None = None) -> str:
        return dump_json(self.to_dict(), path, kind="pareto")


def pareto_frontier(
    table,
    costs,
    kind: str = "size",
    candidates: Sequence[int] = (2, 3, 4, 8),
    *,
    num_points: int = 21,
    budget: float | Alpha | None = None,
    other_budgets: Mapping[str, float | Alpha] | None = None,
    metric="hawq_v2",
    fixed: Mapping[str, Any] | None = None,
    ties: Sequence[Sequence[str]] = (),
    act_candidates: Sequence[int] | str = (DEFAULT_ACT_BITS,),
    backend: str = "CBC",
) -> ParetoFrontier:
    """Sweep the ``kind`` budget over ``num_points`` fractions α in [0, 1] and keep the optimal points.

    Parameters
    ----------
    table, costs, candidates, metric, fixed, ties, act_candidates, backend : as for
        :func:`hqjax.allocate` (HAWQ-V2's metric by default).
    kind : the budget on the horizontal axis.
    num_points : budgets in the sweep (points with the same configuration are merged).
    budget : the budget whose optimal point is marked as chosen (absolute or ``alpha``).
    other_budgets : budgets on other kinds held during the whole sweep.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2 to sweep from all-lowest to all-highest, got {num_points}")
    kw = dict(metric=metric, fixed=fixed, ties=ties, act_candidates=act_candidates, backend=backend)
    others = dict(other_budgets or {})
    if kind in others:
        raise ValueError(f"{kind!r} is the swept budget; leave it out of other_budgets")
    points = {}
    for a in np.linspace(0.0, 1.0, num_points):
        res = allocate(table, costs, {kind: alpha(float(a)), **others}, candidates, **kw)
        points[json.dumps(res.bit_config, sort_keys=True)] = res
    chosen_res = None
    if budget is not None:
        chosen_res = allocate(table, costs, {kind: budget, **others}, candidates, **kw)
        points[json.dumps(chosen_res.bit_config, sort_keys=True)] = chosen_res
    ordered = sorted(points.values(), key=lambda r: (r.costs[kind], r.objective))
    # The lower envelope: drop a point whose objective is not below every cheaper point's.
    front = []
    for r in ordered:
        if not front or r.objective < front[-1].objective:
            front.append(r)
    chosen = None
    if chosen_res is not None:
        chosen = next(i for i, r in enumerate(front) if r.objective <= chosen_res.objective)
    uniform = {}
    for b in sorted({int(c) for c in candidates}):
        fix_all = {n: b for n in (front[0].bit_config)}
        fix_all.update(dict(fixed or {}))
        try:
            r = allocate(table, costs, {}, candidates, **{**kw, "fixed": fix_all})
        except ValueError:  # a tie holds a layer fixed at other bits: no uniform point
            continue
        cost = sum(costs.cost(kind, n, c["weight_bits"], c["act_bits"]) for n, c in r.bit_config.items())
        uniform[b] = (float(cost), r.objective)
    return ParetoFrontier(
        kind=kind,
        costs=tuple(r.costs[kind] for r in front),
        objectives=tuple(r.objective for r in front),
        bit_configs=tuple(r.bit_config for r in front),
        chosen=chosen,
        budget=None if chosen_res is None else chosen_res.limits[kind],
        uniform=uniform,
        metric=front[0].metric,
    )


def plot_pareto(frontier: ParetoFrontier, path: str, *, title: str | None = None) -> str:
    """Save the frontier as a PNG (HAWQ-V2 Fig. 2 style); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = {"size": "model size (bytes)", "bops": "BOPS", "latency": "latency (µs)"}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.step(frontier.costs, frontier.objectives, where="post", color="C0", lw=1.5, label="Pareto frontier")
    ax.plot(frontier.costs, frontier.objectives, "o", color="C0", ms=3)
    for b, (c, o) in frontier.uniform.items():
        ax.plot([c], [o], "s", color="C2", ms=5)
        ax.annotate(f"all {b}-bit", (c, o), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if frontier.chosen is not None:
        i = frontier.chosen
        ax.plot([frontier.costs[i]], [frontier.objectives[i]], "*", color="C3", ms=12, label="chosen")
        ax.axvline(frontier.budget, color="C3", ls="--", lw=0.8, label="budget")
    ax.set_xlabel(units.get(frontier.kind, frontier.kind))
    ax.set_ylabel(f"total sensitivity ({frontier.metric})")
    values = list(frontier.objectives) + [o for _, o in frontier.uniform.values()]
    if min(values) > 0:  # sensitivities span decades between all-lowest and all-highest bits
        ax.set_yscale("log")
    ax.set_title(title or f"Pareto frontier: sensitivity vs {frontier.kind}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
