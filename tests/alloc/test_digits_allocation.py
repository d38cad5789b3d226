"""End to end on real data: a digits CNN, its Hessian traces from hqjax.trace, the allocator."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hqjax
from hqjax.data import load_digits


def symmetric_per_channel(w, bits):
    axes = tuple(range(w.ndim - 1))
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / (2 ** (bits - 1) - 1)
    return jnp.clip(jnp.round(w / scale), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) * scale


class DigitsCNN(nn.Module):
    """A digits CNN with three same-shaped 8->8 convolutions, so layers of equal size exist."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="conv3")(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="conv4")(x))
        return nn.Dense(10, name="dense")(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def trained():
    data = load_digits()
    x, y = jnp.asarray(data.x_train[:256]), jnp.asarray(data.y_train[:256])
    model = DigitsCNN()
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(30):
        params, state = step(params, state)
    return model, params, x, loss


@pytest.mark.slow
def test_more_sensitive_layers_of_equal_size_never_get_fewer_bits(trained):
    model, params, x, loss = trained
    tr = hqjax.trace(hqjax.hessian(loss, params), params, jax.random.key(1), num_probes=16)
    cands = (2, 3, 4, 8)
    table = hqjax.sensitivity_table(params, cands, traces=tr, quantizer=symmetric_per_channel)
    costs = hqjax.LayerCosts.from_model(model, {"params": params}, x[:1])
    scores = hqjax.sensitivity_scores(table, cands, "hawq_v3")
    same_size = [(a, b) for a, b in itertools.combinations(table.names, 2)
                 if costs.n_weights[a] == costs.n_weights[b] and costs.n_bias[a] == costs.n_bias[b]]
    assert len(same_size) == 3

    def more_sensitive(i, j):
        # i gains strictly more than j from every increase in bits: then, by exchanging their
        # bits (same size, same cost), an optimum never gives i fewer bits than j.
        return all(scores[i][lo] - scores[i][hi] > scores[j][lo] - scores[j][hi] for lo, hi in itertools.combinations(cands, 2))

    ordered = [(i, j) if more_sensitive(i, j) else (j, i) for i, j in same_size]
    ordered = [(i, j) for i, j in ordered if more_sensitive(i, j)]
    assert ordered, f"no same-size pair is ordered by sensitivity: traces {tr.per_block()}"
    separated = 0
    for a in np.linspace(0.05, 0.95, 10):
        res = hqjax.allocate(table, costs, {"size": hqjax.alpha(float(a))}, cands, metric="hawq_v3")
        bits = res.weight_bits
        for i, j in ordered:
            assert bits[i] >= bits[j], (a, i, j, bits)
            separated += bits[i] > bits[j]
    assert separated > 0  # the property was exercised, not met by equal bits everywhere
