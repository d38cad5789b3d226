"""Every model hqjax does not ship (tests/user_models.py), Linen and NNX, through the whole
flow: per-layer traces, costs, a sensitivity table, an allocation, calibration, QAT and the
integer-only model. (The >= 99.9% integer/fake-quant agreement on digits' test set is
tests/quant/test_lowering.py's; here the point is that each step takes each model.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import hqjax
from hqjax.train import cross_entropy
import user_models as um


def _data(n=128, seed=0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.uniform(size=(n, 8, 8, 1)), jnp.float32), jnp.asarray(r.integers(0, 10, n), jnp.int32)


def _model(name):
    """``(module as the user has it, model in Linen's convention, variables)``."""
    if name in um.NNX_MODELS:
        module = um.NNX_MODELS[name](nnx.Rngs(0))
        return (module, *hqjax.from_nnx(module))
    module = um.LINEN_MODELS[name]()
    return module, module, um.init_linen(module)


def _stat_paths(stats, prefix=""):
    """Layer paths of a nested ``quant_stats`` collection (a layer's entry holds ``'input'``)."""
    for k, v in stats.items():
        path = f"{prefix}/{k}" if prefix else k
        yield from [path] if "input" in v else _stat_paths(v, path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(um.LINEN_MODELS), *sorted(um.NNX_MODELS)])
def test_user_model_through_traces_allocation_calibration_qat_and_integer(name):
    module, model, variables = _model(name)
    x, y = _data()
    rest = {k: v for k, v in variables.items() if k != "params"}
    loss = lambda p: cross_entropy(model.apply({"params": p, **rest}, x, train=False), y)  # noqa: E731
    names = hqjax.blocks(variables["params"]).names
    tr = hqjax.layer_traces(loss, variables["params"], jax.random.key(0), min_probes=4, max_probes=4)
    # the job's default estimator on the same model: every model here is piecewise linear in
    # each layer (ReLU, ReLU6, max pooling, inference BatchNorm), so it is exact after 2 probes
    model_fn = lambda p, xb: model.apply({"params": p, **rest}, xb, train=False)  # noqa: E731
    split = hqjax.hessian_layer_traces(model_fn, variables["params"], x, y, jax.random.key(0), min_probes=2)
    assert split.block_names == names and np.all(np.asarray(split.num_probes) == 2)
    assert np.all(np.abs(np.asarray(split.stderr)) <= 1e-5 * np.abs(np.asarray(split.traces)))
    # and equals the exact Hessian block trace (jax.hessian) of the model's smallest layer
    blk = hqjax.blocks(variables["params"])
    small = min(names, key=lambda n: blk.sizes[blk.index(n)])
    f_b, theta = hqjax.curvature.block_function(loss, variables["params"], blk, small)
    flat, unravel = ravel_pytree(theta)
    exact = float(np.trace(np.asarray(jax.jit(jax.hessian(lambda z: f_b(unravel(z))))(flat), np.float64)))
    np.testing.assert_allclose(split.per_block()[small][0], exact, rtol=1e-4)
    costs = (hqjax.LayerCosts.from_model(module, x[:1]) if name in um.NNX_MODELS
             else hqjax.LayerCosts.from_model(module, variables, x[:1], train=False))
    assert tr.block_names == names and set(costs.names) == set(names) and len(names) >= 3
    table = hqjax.sensitivity_table(variables["params"], [2, 4, 8], traces=tr)
    budget = {"size": 0.5 * sum(costs.size_bytes(n, 8) for n in names)}
    alloc = hqjax.allocate(table, costs, budget, candidates=(2, 4, 8), act_candidates=(8,))
    assert alloc.costs["size"] <= budget["size"] and len({b["weight_bits"] for b in alloc.bit_config.values()}) > 1

    qm = hqjax.quantize_model(model, alloc.bit_config)
    vq = jax.jit(qm.calibrate)(variables, x)
    assert set(_stat_paths(vq["quant_stats"])) == set(names)
    opt = optax.adam(3e-3)
    step = jax.jit(hqjax.make_qat_step(qm, opt))
    state = hqjax.init_qat_state(vq, opt)
    losses = []
    for _ in range(10):
        state, m = step(state, x, y)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses

    trained = jax.jit(qm.calibrate)(hqjax.state_variables(state), x)
    im = hqjax.to_integer(qm, trained, x.shape[1:])
    fake = np.asarray(jax.jit(qm.apply)(trained, x)).argmax(-1)
    assert np.mean(np.asarray(im(x)).argmax(-1) == fake) >= 0.95
