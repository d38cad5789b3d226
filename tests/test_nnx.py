"""NNX models through the whole flow (hqjax/_nnx.py and its consumers): blocks, per-layer
traces, costs, sensitivity tables and allocation, on models the tests define (each user model
through the whole flow: tests/test_user_models_flow.py).

The twin test holds the strongest claim: one network written in Linen and in NNX with equal
weights gives identical blocks, per-layer traces (same key), costs, allocation and
fake-quant outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hqjax
from hqjax.train import cross_entropy
import user_models as um


def _data(n=64, seed=0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.uniform(size=(n, 8, 8, 1)), jnp.float32), jnp.asarray(r.integers(0, 10, n), jnp.int32)


def _loss(apply, variables, x, y):
    rest = {k: v for k, v in variables.items() if k != "params"}
    return lambda p: cross_entropy(apply({"params": p, **rest}, x, train=False), y)


@pytest.fixture(scope="module")
def twins():
    linen = um.TwinLinen()
    v = um.init_linen(linen, seed=3)
    return linen, v, um.twin_nnx_from_linen(v)


def test_blocks_of_an_nnx_state_are_its_layers():
    model = um.NNXCNN(nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    blk = hqjax.blocks(params)
    assert blk.names == ("conv1", "conv2", "head")
    assert blk.leaf_paths[:2] == ("conv1/bias", "conv1/kernel")
    assert blk.kernel(params, "conv2").shape == (3, 3, 8, 16)
    with pytest.raises(TypeError, match=r"nnx.split\(model, nnx.Param"):
        hqjax.blocks(model)


def test_empty_blocks_and_tables_say_why():
    with pytest.raises(ValueError, match="no layer with a 'kernel' or 'embedding'.*'bn/scale'.*blocks="):
        hqjax.sensitivity_table({"bn": {"scale": jnp.ones(3)}}, [4, 8])
    with pytest.raises(ValueError, match="no layer with a 'kernel'"):
        hqjax.blocks({"w": jnp.ones(3)}).require()
    costs = hqjax.LayerCosts({}, {})
    with pytest.raises(ValueError, match="sensitivity table has no layers"):
        hqjax.allocate(hqjax.SensitivityTable({}), costs, {"size": 1.0})


def test_from_nnx_is_the_module_in_linen_convention():
    class BN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
            self.fc = nnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x):
            return self.fc(nnx.relu(self.bn(self.conv(x))).reshape((x.shape[0], -1)))

    module = BN(nnx.Rngs(0))
    x, _ = _data(8)
    model, variables = hqjax.from_nnx(module)
    assert set(variables) == {"params", "batch_stats"}
    module.eval()
    np.testing.assert_array_equal(model.apply(variables, x), module(x))
    out, new = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    module.train()
    np.testing.assert_allclose(out, module(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], module.bn.mean.value, rtol=1e-5, atol=1e-7)
    assert not np.allclose(new["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])


@pytest.mark.slow
def test_twins_give_the_same_blocks_traces_costs_allocation_and_quantized_outputs(twins):
    linen, v, module = twins
    model, nv = hqjax.from_nnx(module)
    x, y = _data()
    # blocks: NNX State (as nnx.split gives it) and the Linen params
    _, state, rest = nnx.split(module, nnx.Param, ...)
    assert hqjax.blocks(state).names == hqjax.blocks(v["params"]).names == ("conv1", "conv2", "dense")
    # per-layer traces with the same key: a loss of the Linen params vs a loss of the NNX State
    graphdef = nnx.graphdef(module)
    f_nnx = lambda s: cross_entropy(nnx.merge(graphdef, s, rest)(x), y)
    f_linen = _loss(linen.apply, v, x, y)
    key = jax.random.key(7)
    t_nnx = hqjax.trace(lambda u: hqjax.hvp(f_nnx, state, u), state, key, num_probes=8)
    t_linen = hqjax.trace(lambda u: hqjax.hvp(f_linen, v["params"], u), v["params"], key, num_probes=8)
    assert t_nnx.block_names == t_linen.block_names
    np.testing.assert_allclose(t_nnx.block_traces, t_linen.block_traces, rtol=1e-5)
    # costs: the NNX module itself, and from_nnx's pair
    xs = jnp.zeros((1, 8, 8, 1))
    costs = hqjax.LayerCosts.from_model(linen, v, xs, train=False)
    assert hqjax.LayerCosts.from_model(module, xs) == costs
    assert hqjax.LayerCosts.from_model(model, nv, xs, train=False) == costs
    # sensitivity tables and allocation
    tables = [hqjax.sensitivity_table(p, [2, 4, 8], traces=t) for p, t in ((state, t_nnx), (v["params"], t_linen))]
    assert tables[0].names == tables[1].names
    for a, b in zip(tables[0].rows.values(), tables[1].rows.values()):
        assert a.perturbation == b.perturbation and a.n_params == b.n_params
        np.testing.assert_allclose(a.trace, b.trace, rtol=1e-5)
    budget = {"size": 0.5 * sum(costs.size_bytes(n, 8) for n in costs.names)}
    allocs = [hqjax.allocate(t, costs, budget, candidates=(2, 4, 8)) for t in tables]
    assert allocs[0].bit_config == allocs[1].bit_config
    assert len(set(allocs[0].weight_bits.values())) > 1  # a mixed allocation, not a trivial one
    # fake-quant outputs after calibration
    ql, qn = hqjax.quantize_model(linen, allocs[0].bit_config), hqjax.quantize_model(module, allocs[0].bit_config)
    vl, vn = jax.jit(ql.calibrate)(v, x), jax.jit(qn.calibrate)(nv, x)
    np.testing.assert_array_equal(jax.jit(ql.apply)(vl, x), jax.jit(qn.apply)(vn, x))
