"""Weight fake-quant for NNX models (hqjax/quant/nnx_transform.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hqjax
from hqjax.quant.quantizers import QuantSpec, fake_quant


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.dense(nnx.relu(self.conv1(x)).reshape(x.shape[0], -1))


def test_quantize_nnx_matches_quantize_params_and_leaves_input_alone():
    model = _Net(nnx.Rngs(0))
    before = np.asarray(model.dense.kernel[...])
    cfg = {"dense": {"weight_bits": 4, "act_bits": None}}
    q = hqjax.quantize_nnx(model, cfg)
    np.testing.assert_array_equal(np.asarray(q.dense.kernel[...]), fake_quant(jnp.asarray(before), QuantSpec(bits=4, axis=-1)))
    np.testing.assert_array_equal(np.asarray(model.dense.kernel[...]), before)
    np.testing.assert_array_equal(np.asarray(q.conv1.kernel[...]), np.asarray(model.conv1.kernel[...]))


def test_nnx_state_quantization_trains_with_ste():
    model = _Net(nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cfg = hqjax.uniform_bit_config(["conv1", "dense"], 4, None)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)), jnp.float32)
    y = jnp.arange(16) % 10

    def loss(p):
        net = nnx.merge(graphdef, hqjax.quantize_nnx_state(p, cfg), rest)
        return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()

    g = jax.jit(jax.grad(loss))(params)
    assert all(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(g))
    stepped = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
    assert float(loss(stepped)) < float(loss(params))


# --------------------------------------------------------------------------- activations
import flax.linen as nn
import pytest


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        return nn.Dense(10, name="dense")(h.reshape(x.shape[0], -1))


_CFG = {"conv1": {"weight_bits": 4, "act_bits": 8}, "dense": {"weight_bits": 3, "act_bits": 4}}


@pytest.fixture(scope="module")
def nnx_setup():
    model = _Net(nnx.Rngs(2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32) for _ in range(2)]
    qm = hqjax.quantize_nnx_model(model, _CFG)
    calibrate = jax.jit(qm.calibrate)
    stats = calibrate(params, rest, calibrate(params, rest, None, xs[0]), xs[1])
    return qm, params, rest, stats, xs


def test_nnx_model_matches_linen_quantize_model(nnx_setup):
    qm, params, rest, stats, xs = nnx_setup
    linen_vars = {"params": nnx.to_pure_dict(params)}  # same paths and kernel layouts as Linen
    lq = hqjax.quantize_model(_LinenNet(), _CFG)
    for x in xs:
        linen_vars = lq.calibrate(linen_vars, x)
    chex_equal = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.tree.map(chex_equal, stats, linen_vars[hqjax.quant.STATS])
    y_nnx = jax.jit(qm.apply)(params, rest, stats, xs[0])
    y_linen = jax.jit(lq.apply)(linen_vars, xs[0])
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-6)
    # and against the hand computation with fake_quant on inputs and kernels
    p = nnx.to_pure_dict(params)
    aq = lambda x, layer, bits: fake_quant(x, QuantSpec(bits=bits, mode="asymmetric"),
                                           (stats[layer]["input"]["min"], stats[layer]["input"]["max"]))
    w = lambda layer, bits: fake_quant(p[layer]["kernel"], QuantSpec(bits=bits, axis=-1))
    h = jax.lax.conv_general_dilated(aq(xs[0], "conv1", 8), w("conv1", 4), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv1"]["bias"]
    h = jax.nn.relu(h).reshape(8, -1)
    y_hand = aq(h, "dense", 4) @ w("dense", 3) + p["dense"]["bias"]
    np.testing.assert_allclose(y_nnx, y_hand, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_nnx, qm.float_apply(params, rest, xs[0]), atol=1e-3)  # quantization did act


def test_nnx_model_gradient_is_straight_through(nnx_setup):
    qm, params, rest, stats, xs = nnx_setup
    g = jax.jit(jax.grad(lambda p: qm.apply(p, rest, stats, xs[0]).sum()))(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    # STE: d/dW_dense of sum(Q_a(h) @ Q_w(W) + b) = Q_a(h)^T 1 (identity through Q_w)
    p = nnx.to_pure_dict(params)
    h = jax.nn.relu(jax.lax.conv_general_dilated(
        fake_quant(xs[0], QuantSpec(bits=8, mode="asymmetric"), (stats["conv1"]["input"]["min"], stats["conv1"]["input"]["max"])),
        fake_quant(p["conv1"]["kernel"], QuantSpec(bits=4, axis=-1)), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv1"]["bias"]).reshape(8, -1)
    hq = fake_quant(h, QuantSpec(bits=4, mode="asymmetric"), (stats["dense"]["input"]["min"], stats["dense"]["input"]["max"]))
    expected = jnp.broadcast_to(hq.sum(0)[:, None], p["dense"]["kernel"].shape)
    np.testing.assert_allclose(nnx.to_pure_dict(g)["dense"]["kernel"], expected, rtol=1e-5, atol=1e-5)


def test_nnx_model_uncalibrated_layer_raises_naming_it(nnx_setup):
    qm, params, rest, stats, xs = nnx_setup
    with pytest.raises(ValueError, match="'dense'"):
        qm.apply(params, rest, {"conv1": stats["conv1"]}, xs[0])
    with pytest.raises(ValueError, match="'conv1'"):
        qm.apply(params, rest, {}, xs[0])
    with pytest.raises(ValueError, match="nope"):
        hqjax.quantize_nnx_model(_Net(nnx.Rngs(0)), {"nope": {"weight_bits": 4, "act_bits": 8}})


def test_nnx_model_trains_in_an_optax_loop_under_jit(nnx_setup):
    qm, params, rest, stats, xs = nnx_setup
    y = jnp.arange(8) % 10
    opt = optax.adam(1e-2)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(qm.apply(p, rest, stats, xs[0]), y).mean()

    @jax.jit
    def step(p, opt_state):
        value, g = jax.value_and_grad(loss)(p)
        updates, opt_state = opt.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    p, opt_state = params, opt.init(params)
    losses = []
    for _ in range(15):
        p, opt_state, value = step(p, opt_state)
        losses.append(float(value))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert isinstance(p, nnx.State) and jax.tree.structure(p) == jax.tree.structure(params)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)

    def __call__(self, x, train):
        return nnx.relu(self.bn(self.dense(x), use_running_average=not train))


class _Deep(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([_Block(rngs), _Block(rngs)])
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x, train=False):
        for block in self.blocks:
            x = block(x, train)
        return self.head(x)


def test_nnx_model_nested_layers_and_batchnorm_state():
    model = _Deep(nnx.Rngs(0))
    cfg = {"blocks/1/dense": {"weight_bits": 4, "act_bits": 8}, "head": {"weight_bits": 4, "act_bits": 8}}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    qm = hqjax.quantize_nnx_model(model, cfg)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32)
    stats = qm.calibrate(params, rest, None, x)
    assert sorted(stats) == ["blocks/1/dense", "head"]  # layers without act_bits get no range
    y, new_rest = qm.apply(params, rest, stats, x, train=True, mutable=True)
    assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
    moved = nnx.to_pure_dict(new_rest)["blocks"][0]["bn"]["mean"]
    assert float(jnp.abs(moved).max()) > 0  # training-mode BatchNorm statistics came back
    np.testing.assert_array_equal(np.asarray(model.blocks[0].bn.mean[...]), 0.0)  # input model untouched
    assert y.shape == (4, 3)


def test_act_bits_on_a_stacked_nnx_layer_are_refused_by_name():
    """Layers made by nnx.vmap and applied under nnx.scan: their input ranges would leak the
    scan's tracers, so act_bits on them are refused (both NNX routes); weights alone work."""
    import hqjax
    import user_models as um
    from flax import nnx

    x = jnp.ones((4, 8, 8, 1))
    cfg = {"blocks/fc1": {"weight_bits": 4, "act_bits": 8}, "head": {"weight_bits": 4, "act_bits": 8}}
    model, v = hqjax.from_nnx(um.nnx_scan_mlp())
    qm = hqjax.quantize_model(model, cfg)
    with pytest.raises(ValueError, match=r"\['blocks/fc1'\] run stacked .*act_bits=None"):
        jax.jit(qm.calibrate)(v, x)
    module = um.NNXScanMLP(nnx.Rngs(0))
    qn = hqjax.quantize_nnx_model(module, cfg)
    _, params, rest = nnx.split(module, nnx.Param, ...)
    with pytest.raises(ValueError, match=r"\['blocks/fc1'\] run stacked"):
        qn.calibrate(params, rest, None, x)
    weights_only = hqjax.quantize_model(model, {**cfg, "blocks/fc1": {"weight_bits": 4, "act_bits": None}})
    assert weights_only.apply(weights_only.calibrate(v, x), x).shape == (4, 10)
