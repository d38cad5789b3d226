import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax
from hqjax.curvature import LayerTraceResult, layer_traces, result_from_dict


def test_every_layer_within_4_stderr_of_exact_block_trace_and_stops_at_rtol(coupled):
    res = layer_traces(coupled["loss"], coupled["params"], jax.random.key(1), rtol=0.05, max_probes=400)
    assert res.block_names == ("conv1", "conv2", "dense")
    for name, (t, se) in res.per_block().items():
        exact = coupled["exact"][name]
        assert abs(t - exact) <= 4 * se + 1e-6, (name, t, se, exact)
    n = np.asarray(res.num_probes)
    rse = res.relative_stderr()
    assert np.all((rse <= 0.05) | (n == 400)) and np.all(n >= 10)
    # the adaptive stop spends different numbers of probes on different layers
    assert len(set(n.tolist())) > 1


def test_stated_standard_errors_cover_the_exact_traces(coupled):
    # 300 independent runs of 30 probes per layer in one compiled program (device loop under
    # vmap): |estimate - exact| <= 2 stderr should hold ~95% of the time (Student t with 29
    # degrees of freedom gives 94.5%).
    run = jax.jit(jax.vmap(lambda k: layer_traces(coupled["loss"], coupled["params"], k, rtol=0.0,
                                                   min_probes=30, max_probes=30, loop="device")))
    res = run(jax.random.split(jax.random.key(2), 300))
    assert np.all(np.asarray(res.num_probes) == 30)
    exact = np.array([coupled["exact"][n] for n in res.block_names])
    hit = np.abs(np.asarray(res.traces) - exact) <= 2 * np.asarray(res.stderr)
    assert 0.88 <= hit.mean() <= 0.99, hit.mean(0)
    # unbiased: the mean over runs is within 4 of its own standard errors of the exact trace
    t = np.asarray(res.traces, np.float64)
    assert np.all(np.abs(t.mean(0) - exact) <= 4 * t.std(0) / np.sqrt(len(t))), (t.mean(0), exact)


def test_per_layer_probes_beat_the_one_pass_per_block_estimate_on_a_coupled_cnn(coupled):
    # Same number of probes per layer: the one-pass estimate carries cross-layer terms.
    p, f = coupled["params"], coupled["loss"]
    one_pass = hqjax.trace(hqjax.hessian(f, p), p, jax.random.key(3), num_probes=64)
    per_layer = layer_traces(f, p, jax.random.key(3), rtol=0.0, min_probes=64, max_probes=64)
    assert np.all(np.asarray(per_layer.stderr) < np.asarray(one_pass.block_stderr))


def test_names_subset_and_chunking_give_the_same_numbers_and_loops_agree(coupled):
    p, f = coupled["params"], coupled["loss"]
    kw = dict(rtol=0.0, min_probes=6, max_probes=6)
    full = layer_traces(f, p, jax.random.key(4), **kw)
    sub = layer_traces(f, p, jax.random.key(4), names=["dense", "conv1"], chunk_size=3, **kw)
    dev = layer_traces(f, p, jax.random.key(4), loop="device", **kw)
    assert sub.block_names == ("dense", "conv1")
    np.testing.assert_allclose(np.asarray(sub.traces), np.asarray(full.traces)[[2, 0]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dev.traces), np.asarray(full.traces), rtol=1e-5)


def test_result_is_a_pytree_and_round_trips_json(coupled):
    res = layer_traces(coupled["loss"], coupled["params"], jax.random.key(5), max_probes=12)
    assert isinstance(res, LayerTraceResult)
    leaves = jax.tree.leaves(res)
    assert len(leaves) == 3
    back = result_from_dict(json.loads(res.to_json()))
    assert back.block_names == res.block_names and back.curvature == "hessian"
    np.testing.assert_allclose(back.traces, res.traces)
    # the sensitivity table reads it like a TraceResult
    table = hqjax.sensitivity_table(coupled["params"], (4, 8), traces=res, quantizer=lambda w, b: jnp.round(w * b) / b)
    assert table["dense"].trace == pytest.approx(res.per_block()["dense"][0])


def test_bad_arguments_fail_early_with_a_clear_message(coupled):
    p, f, k = coupled["params"], coupled["loss"], jax.random.key(0)
    with pytest.raises(ValueError, match="rtol"):
        layer_traces(f, p, k, rtol=-1)
    with pytest.raises(ValueError, match="min_probes"):
        layer_traces(f, p, k, min_probes=50, max_probes=10)
    with pytest.raises(KeyError, match="conv1"):
        layer_traces(f, p, k, names=["nope"])


def test_linearized_and_forward_over_reverse_products_give_the_same_estimates(coupled):
    kw = dict(rtol=0.0, min_probes=5, max_probes=5)
    a = layer_traces(coupled["loss"], coupled["params"], jax.random.key(6), linearize=True, **kw)
    b = layer_traces(coupled["loss"], coupled["params"], jax.random.key(6), linearize=False, **kw)
    np.testing.assert_allclose(np.asarray(a.traces), np.asarray(b.traces), rtol=1e-4, atol=1e-5)
