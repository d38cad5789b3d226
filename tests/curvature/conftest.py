"""A tiny digits CNN whose exact Hessian (``jax.hessian`` + ``numpy.linalg.eigh``) is the truth.

Built once per session and shared by every curvature test, so compiled functions and the
exact spectrum are paid for once.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hqjax
from hqjax.data import load_digits
from hqjax.models import get_model


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def cnn(digits):
    model = get_model("cnn", channels=(3, 6))  # 1,168 parameters: exact Hessian in ~2 s
    x, y = jnp.asarray(digits.x_train[:32]), jnp.asarray(digits.y_train[:32])
    params = model.init(jax.random.key(0), x, train=False)["params"]
    # Flax initializes biases to zero and digits have blank borders, so many ReLU inputs are
    # exactly 0, where the Hessian is undefined and loop / straight-line code pick different
    # one-sided derivatives. Small random biases keep every test at a smooth point.
    params = dict(params, **{k: dict(v, bias=0.05 * jax.random.normal(jax.random.key(i + 1), v["bias"].shape))
                             for i, (k, v) in enumerate(params.items())})

    def loss(p, x=x, y=y):
        logits = model.apply({"params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda z: loss(unravel(z))))(flat), np.float64)
    H = (H + H.T) / 2
    evals, evecs = np.linalg.eigh(H)
    blk = hqjax.blocks(params)
    # Indices of each block's entries in the flat (ravel_pytree = jax.tree.leaves) order.
    offsets = np.cumsum([0] + [x.size for x in jax.tree.leaves(params)])
    idx = {name: np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, b in enumerate(blk.leaf_block)
                                 if b == blk.index(name)]) for name in blk.names}
    return types.SimpleNamespace(model=model, x=x, y=y, params=params, loss=lambda p: loss(p), loss_xy=loss,
                                 flat=flat, unravel=unravel, H=H, evals=evals, evecs=evecs, blocks=blk, idx=idx,
                                 matvec=hqjax.hessian(lambda p: loss(p), params))


def top_by_magnitude(evals, k):
    return evals[np.argsort(-np.abs(evals))[:k]]


# ---- explicit small operators on a params-like pytree, for cheap exact tests

PARAMS = {"a": {"kernel": jnp.zeros((5, 4)), "bias": jnp.zeros((4,))}, "b": {"kernel": jnp.zeros((2, 4))}}


def explicit_operator(M, params=PARAMS):
    """``v -> M v`` on pytrees shaped like ``params`` for a dense symmetric ``M``."""
    _, unravel = ravel_pytree(params)
    M = jnp.asarray(M, jnp.float32)
    return lambda v: unravel(M @ ravel_pytree(v)[0])


def random_symmetric(n, seed=0, rank=None, spread=1.0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, rank or n))
    return (A @ A.T) / n * spread if rank else (A + A.T) / 2


def block_indices(params=PARAMS):
    blk = hqjax.blocks(params)
    offsets = np.cumsum([0] + [x.size for x in jax.tree.leaves(params)])
    return blk, {name: np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, b in enumerate(blk.leaf_block)
                                       if b == blk.index(name)]) for name in blk.names}


@pytest.fixture(scope="session")
def ex():
    """Helpers for explicit operators (pytest's importlib mode cannot import helper modules)."""
    return types.SimpleNamespace(PARAMS=PARAMS, operator=explicit_operator, symmetric=random_symmetric,
                                 block_indices=block_indices, top_by_magnitude=top_by_magnitude)


# ---- a small CNN whose layers are coupled (a residual), with exact per-block Hessian traces

class CoupledCNN(nn.Module):
    """conv -> conv with a residual -> dense: every layer's curvature depends on the others."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(3, (3, 3), name="conv1")(x))
        h = h + jnp.tanh(nn.Conv(3, (3, 3), name="conv2")(h))
        return nn.Dense(4, name="dense")(h.reshape(h.shape[0], -1))


@pytest.fixture(scope="session")
def coupled():
    """The model, its loss and the exact per-block Hessian traces (``jax.hessian`` per block)."""
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (16, 5, 5, 1))
    y = jax.random.randint(ky, (16,), 0, 4)
    model = CoupledCNN()
    params = model.init(kp, x)["params"]
    # Larger weights than the default initialization couple the layers more strongly.
    params = jax.tree.map(lambda p: 2.0 * p + 0.1, params)

    def model_fn(p, xb):
        return model.apply({"params": p}, xb)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model_fn(p, x), y).mean()

    blk = hqjax.blocks(params)
    exact = {}
    for name in blk.names:
        f_b, theta = hqjax.curvature.block_function(loss, params, blk, name)
        flat, unravel = ravel_pytree(theta)
        exact[name] = float(np.trace(np.asarray(jax.jit(jax.hessian(lambda z: f_b(unravel(z))))(flat), np.float64)))
    return dict(model_fn=model_fn, loss=loss, params=params, x=x, y=y, blocks=blk, exact=exact)
