"""Shared fixtures for the quantization tests: digits and a small CNN/MLP trained once per session."""

import jax
import numpy as np
import optax
import pytest

from hqjax.data import load_digits
from hqjax.models import CNN, MLP


@pytest.fixture(scope="session")
def digits():
    return load_digits()


def numpy_init(model, x, seed: int = 0):
    """He-normal kernels, zero biases, unit BatchNorm, drawn with NumPy on the shapes from
    ``jax.eval_shape``: compiling ``model.init`` (threefry for every leaf) takes tens of
    seconds on a loaded 2-core machine, tracing its shapes a fraction of one."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("kernel", "embedding"):
            fan_in = int(np.prod(s.shape[:-1])) if name == "kernel" else 1
            return (rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)).astype(s.dtype)
        if name in ("scale", "var"):
            return np.ones(s.shape, s.dtype)
        return np.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="session")
def init_np():
    return numpy_init


def train_float(model, data, epochs: int, seed: int = 0, lr: float = 3e-3, batch: int = 64):
    """Plain float training (Adam) of a model without BatchNorm; returns its variables."""
    variables = numpy_init(model, data.x_train[:2], seed)
    opt = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = variables["params"], opt.init(variables["params"])
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(data.x_train))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            params, opt_state = step(params, opt_state, data.x_train[idx], data.y_train[idx])
    return {"params": params}


def accuracy(logits, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


@pytest.fixture(scope="session")
def trained_cnn(digits):
    model = CNN()
    return model, train_float(model, digits, epochs=10)


@pytest.fixture(scope="session")
def trained_mlp(digits):
    model = MLP()
    return model, train_float(model, digits, epochs=10)


@pytest.fixture(scope="session")
def acc():
    return accuracy
