"""Sensitivity table, metric registry and HAWQ-V1 orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax
from hqjax.alloc import sensitivity as sens
from hqjax.models import CNN


def symmetric_per_channel(w, bits):
    """A tiny symmetric per-output-channel uniform quantizer (the test's own, independent of hqjax.quant)."""
    axes = tuple(range(w.ndim - 1))
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / (2 ** (bits - 1) - 1)
    return jnp.clip(jnp.round(w / scale), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) * scale


@pytest.fixture(scope="module")
def params():
    return CNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


def test_perturbations_match_the_quantizer_and_shrink_with_bits(params):
    pert = hqjax.weight_perturbations(params, (2, 4, 8), quantizer=symmetric_per_channel)
    for name in ("conv1", "conv2", "dense"):
        w = np.asarray(params[name]["kernel"], np.float64)
        q = np.asarray(symmetric_per_channel(params[name]["kernel"], 4), np.float64)
        assert pert[name][4] == pytest.approx(np.sum((q - w) ** 2), rel=1e-5)
        assert pert[name][2] > pert[name][4] > pert[name][8] > 0


def test_attention_kernel_perturbation_is_its_dense_matrix_s():
    """ΔW of a (in, heads, head_dim) projection is that of the same weights as a Dense
    (in, heads * head_dim) kernel: per-channel means per output feature, as in quantize_params."""
    w = jax.random.normal(jax.random.key(3), (8, 2, 4)) * jnp.array([0.1, 2.0])[None, :, None]
    general = {"q": {"kernel": w, "bias": jnp.zeros((2, 4))}}
    dense = {"q": {"kernel": w.reshape(8, 8), "bias": jnp.zeros(8)}}
    a, b = sens.weight_perturbations(general, [2, 4]), sens.weight_perturbations(dense, [2, 4])
    assert a == b
    last_axis = float(hqjax.weight_perturbation(w, 2))
    assert a["q"][2] != pytest.approx(last_axis, rel=1e-3)  # the old per-last-axis grouping differs


def test_table_from_curvature_results_round_trips_through_json(params, tmp_path):
    traces = {"conv1": (3.0, 0.1), "conv2": (2.0, 0.2), "dense": (1.0, 0.05)}
    eig = {"conv1": [5.0, 1.0], "conv2": np.array([4.0]), "dense": [0.5]}
    samples = {"conv1": [1.0, 2.0, 3.0], "conv2": [1.0, 1.0], "dense": [0.1, 0.3]}
    table = hqjax.sensitivity_table(params, (4, 8), traces=traces, eigenvalues=eig, eigenvalue_samples=samples,
                                    act_traces={"conv2": 0.7}, act_perturbations={"conv2": {4: 0.3, 8: 0.01}},
                                    quantizer=symmetric_per_channel)
    assert table["conv2"].act_trace == 0.7 and table["conv2"].act_perturbation == {4: 0.3, 8: 0.01}
    assert table["conv1"].act_trace is None
    assert table.names == ("conv1", "conv2", "dense")
    assert table["conv1"].n_params == 3 * 3 * 1 * 8 + 8
    assert table["conv2"].trace == 2.0 and table["conv2"].trace_stderr == 0.2
    assert table["conv1"].eigenvalues == (5.0, 1.0)
    w = np.asarray(params["dense"]["kernel"], np.float64)
    assert table["dense"].weight_norm_sq == pytest.approx(np.sum(w * w), rel=1e-6)
    path = str(tmp_path / "table.json")
    table.to_json(path)
    assert hqjax.SensitivityTable.from_json(path) == table
    assert hqjax.SensitivityTable.from_json(table.to_json()) == table


def test_builtin_metrics_follow_their_papers():
    row = hqjax.LayerSensitivity(n_params=10, perturbation={4: 2.0, 8: 0.5}, trace=30.0,
                                 eigenvalues=(7.0, 2.0), eigenvalue_samples=(1.0, 3.0))
    assert hqjax.get_metric("hawq_v1")(row, 4) == 7.0 / 10 * 2.0
    assert hqjax.get_metric("hawq_v2")(row, 8) == 30.0 / 10 * 0.5
    assert hqjax.get_metric("hawq_v3")(row, 4) == 30.0 / 10 * 2.0  # V3 keeps V2's average trace (Eq. 12)
    assert hqjax.get_metric("total_trace")(row, 4) == 30.0 * 2.0
    assert hqjax.get_metric("qbert")(row, 8) == pytest.approx((2.0 + 1.0) * 0.5)  # |mean| + std
    with pytest.raises(ValueError, match="'trace'"):
        hqjax.get_metric("hawq_v3")(hqjax.LayerSensitivity(n_params=1, perturbation={4: 1.0}), 4)
    with pytest.raises(KeyError, match="2 bits"):
        hqjax.get_metric("hawq_v3")(row, 2)


def test_registered_metric_is_usable_by_name_in_allocate():
    name = "test_trace_per_norm"

    @hqjax.register_metric(name)
    def trace_per_norm(row, bits):
        return row.trace * row.perturbation[bits] / row.weight_norm_sq

    try:
        assert name in hqjax.metric_names() and hqjax.get_metric(name) is trace_per_norm
        table = hqjax.SensitivityTable({
            "a": hqjax.LayerSensitivity(10, {4: 1.0, 8: 0.1}, trace=1.0, weight_norm_sq=1.0),
            "b": hqjax.LayerSensitivity(10, {4: 1.0, 8: 0.1}, trace=1.0, weight_norm_sq=100.0),
        })
        costs = hqjax.LayerCosts({"a": 10, "b": 10}, {"a": 1, "b": 1})
        res = hqjax.allocate(table, costs, {"size": hqjax.alpha(0.5)}, (4, 8), metric=name)
        # Equal traces and perturbations: only the user metric's norm makes 'a' the sensitive one.
        assert res.weight_bits == {"a": 8, "b": 4} and res.metric == name
        with pytest.raises(ValueError, match="already registered"):
            hqjax.register_metric(name, lambda row, bits: 0.0)
        hqjax.register_metric(name, trace_per_norm)  # re-registering the same function is fine
    finally:
        sens._METRICS.pop(name, None)
    with pytest.raises(KeyError, match="hawq_v3"):
        hqjax.get_metric(name)


def test_hawq_v1_orders_are_deterministic():
    table = hqjax.SensitivityTable({
        "c": hqjax.LayerSensitivity(10, {4: 1.0, 8: 0.1}, eigenvalues=(20.0,)),
        "a": hqjax.LayerSensitivity(20, {4: 3.0, 8: 0.1}, eigenvalues=(40.0,)),
        "b": hqjax.LayerSensitivity(5, {4: 1.0, 8: 0.2}, eigenvalues=(1.0,)),
    })
    # λ/n: a 2.0, c 2.0, b 0.2 -> the tie a/c is broken by name.
    assert hqjax.alloc.hawq_v1_order(table) == ["a", "c", "b"]
    # Ω = λ ||Q(W)-W||^2 at the assigned bits: a 40*0.1=4, c 20*1=20, b 1*1=1.
    cfg = {"a": {"weight_bits": 8, "act_bits": 8}, "c": 4, "b": 4}
    assert hqjax.alloc.hawq_v1_finetune_order(table, cfg) == ["c", "a", "b"]


def test_metrics_declare_what_they_read_and_undeclared_ones_get_the_safe_default():
    assert "eigenvalues" not in hqjax.alloc.metric_needs("hawq_v3") and "trace" in hqjax.alloc.metric_needs("hawq_v3")
    assert "eigenvalues" in hqjax.alloc.metric_needs("hawq_v1") and "trace" not in hqjax.alloc.metric_needs("hawq_v1")
    name = "test_needs_default"
    hqjax.register_metric(name, lambda row, bits: 0.0)
    try:
        assert hqjax.alloc.metric_needs(name) == {"trace", "eigenvalues"}
    finally:
        sens._METRICS.pop(name, None)
    with pytest.raises(ValueError, match="unknown field"):
        hqjax.register_metric("test_bad_needs", lambda row, bits: 0.0, needs=("traces",))
    assert "test_bad_needs" not in hqjax.metric_names()
