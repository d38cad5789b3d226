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
