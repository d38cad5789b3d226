"""HAWQ-V2's Pareto frontier against brute force."""

import itertools

import numpy as np
import pytest

import hqjax


def test_frontier_is_the_brute_force_lower_envelope(tmp_path):
    rng = np.random.default_rng(0)
    layers = [f"l{i}" for i in range(5)]
    cands = (2, 4, 8)
    costs = hqjax.LayerCosts({n: int(rng.integers(100, 10_000)) for n in layers}, {n: 1 for n in layers})
    scores = {n: {b: float(rng.lognormal()) * 4.0 ** -b for b in cands} for n in layers}
    front = hqjax.pareto_frontier(scores, costs, "size", cands, num_points=200, budget=hqjax.alpha(0.5))
    # Brute force: every configuration's (size, sensitivity), and the best sensitivity within each size.
    points = []
    for assign in itertools.product(cands, repeat=len(layers)):
        points.append((sum(costs.size_bytes(n, b) for n, b in zip(layers, assign)),
                       sum(scores[n][b] for n, b in zip(layers, assign))))
    for c, o in zip(front.costs, front.objectives):
        assert o == pytest.approx(min(p[1] for p in points if p[0] <= c * (1 + 1e-12)), rel=1e-9)
    assert list(front.costs) == sorted(front.costs)
    assert all(a > b for a, b in zip(front.objectives, front.objectives[1:]))
    assert front.uniform[2][0] == front.costs[0] and front.uniform[8][0] == front.costs[-1]
    limit = front.budget
    assert front.objectives[front.chosen] == pytest.approx(min(p[1] for p in points if p[0] <= limit), rel=1e-9)
    path = hqjax.plot_pareto(front, str(tmp_path / "front.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
