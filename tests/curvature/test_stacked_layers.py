"""Per-layer curvature of stacked layers (``nn.scan``; ``nnx.vmap`` + ``nnx.scan``): each layer
of a stack is a block, and its trace is the trace of its own diagonal block of the exact
Hessian of the whole network (``jax.hessian`` over every parameter)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hqjax
from hqjax.curvature import deflated_layer_traces, ggn_layer_traces, hessian_layer_traces, layer_traces
from user_models import NNXScanMLP, ScanMLP

LAYERS = tuple(f"blocks/{fc}[{i}]" for i in range(3) for fc in ("fc1", "fc2")) + ("embed", "head")


def _case(kind, digits):
    x, y = jnp.asarray(digits.x_train[:32]), jnp.asarray(digits.y_train[:32])
    if kind == "linen":
        model = ScanMLP()
        variables = model.init(jax.random.key(0), x[:2])
    else:
        from flax import nnx
        model, variables = hqjax.from_nnx(NNXScanMLP(nnx.Rngs(0)))
    # small random biases: no ReLU input sits exactly at its kink
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), variables["params"])
    model_fn = lambda p, xb: model.apply({**variables, "params": p}, xb)  # noqa: E731
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model_fn(p, x), y).mean()  # noqa: E731
    blk = hqjax.blocks(params, stacked=hqjax.stacked_modules(model, variables, x[:2]))
    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda z: loss(unravel(z))))(flat), np.float64)
    # each block's entries in the flat order: whole leaves, or one slice along a stacked leaf's axis 0
    offsets = np.cumsum([0] + [a.size for a in jax.tree.leaves(params)])
    sizes = [a.size for a in jax.tree.leaves(params)]
    exact = {}
    for name in blk.names:
        idx = []
        for leaf, j in blk.parts(name):
            n = sizes[leaf] if j is None else sizes[leaf] // len(blk.leaf_block[leaf])
            start = offsets[leaf] + (0 if j is None else j * n)
            idx.append(np.arange(start, start + n))
        idx = np.concatenate(idx)
        exact[name] = float(np.trace(H[np.ix_(idx, idx)]))
    return dict(model_fn=model_fn, loss=loss, params=params, x=x, y=y, blocks=blk, exact=exact)


@pytest.fixture(scope="module", params=["linen", "nnx"])
def stacked(request, digits):
    return _case(request.param, digits)


def test_each_layer_of_a_stack_is_a_block(stacked):
    assert set(stacked["blocks"].names) == set(LAYERS)
    assert stacked["blocks"].names[:6] == LAYERS[:6]  # layer by layer through the stack


def test_split_traces_equal_the_exact_diagonal_blocks(stacked):
    """ReLU residual blocks are piecewise linear: the Gauss-Newton split is exact."""
    c = stacked
    res = hessian_layer_traces(c["model_fn"], c["params"], c["x"], c["y"], jax.random.key(0), blocks=c["blocks"],
                               min_probes=3)
    for name, (t, _) in res.per_block().items():
        np.testing.assert_allclose(t, c["exact"][name], rtol=1e-4, err_msg=name)
    # the three layers of a stack differ: one trace for the stack would hide it
    fc1 = [c["exact"][f"blocks/fc1[{i}]"] for i in range(3)]
    assert max(fc1) > 1.2 * min(fc1)
    ggn = ggn_layer_traces(c["model_fn"], c["params"], c["x"], blocks=c["blocks"])
    np.testing.assert_allclose(np.asarray(ggn.traces), np.asarray(res.traces), rtol=1e-4)


def test_hutchinson_and_deflated_traces_cover_the_exact_blocks(stacked):
    c = stacked
    for res in (layer_traces(c["loss"], c["params"], jax.random.key(1), blocks=c["blocks"], rtol=0.05,
                             max_probes=300),
                deflated_layer_traces(hqjax.hessian(c["loss"], c["params"]), c["params"], jax.random.key(2), k=4,
                                      lanczos_steps=12, blocks=c["blocks"], rtol=0.05, max_probes=300)):
        for name, (t, se) in res.per_block().items():
            assert abs(t - c["exact"][name]) <= 4 * se + 1e-4 * abs(c["exact"][name]), (res.method, name, t, se)


def test_activation_traces_refuse_layers_inside_a_scan(digits):
    model = ScanMLP()
    x, y = jnp.asarray(digits.x_train[:8]), jnp.asarray(digits.y_train[:8])
    v = model.init(jax.random.key(0), x)
    loss = lambda out: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"layer 'blocks/fc1' runs inside scan\(blocks\).*not per layer"):
        hqjax.activation_traces(model, v, x, loss, jax.random.key(0), num_probes=2)
