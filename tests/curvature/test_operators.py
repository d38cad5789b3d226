import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hqjax


def _rand(key, like):
    return hqjax.tree.tree_random_like(key, like, "gaussian")


def test_hvp_and_both_hessian_operators_match_jax_hessian(cnn):
    v = _rand(jax.random.key(3), cnn.params)
    want = cnn.H @ np.asarray(ravel_pytree(v)[0], np.float64)
    scale = np.linalg.norm(want)
    lin = hqjax.hessian(cnn.loss, cnn.params, linearize=True)
    for got in (jax.jit(lambda v: hqjax.hvp(cnn.loss, cnn.params, v))(v), jax.jit(cnn.matvec)(v), jax.jit(lin)(v)):
        np.testing.assert_allclose(ravel_pytree(got)[0], want, atol=2e-5 * scale)


def test_ggn_is_jt_hl_j_and_positive_semidefinite(cnn):
    model_fn = lambda p: cnn.model.apply({"params": p}, cnn.x[:2], train=False)
    loss_fn = lambda out: optax.softmax_cross_entropy_with_integer_labels(out, cnn.y[:2]).mean()
    mv = hqjax.ggn(model_fn, loss_fn, cnn.params)
    J = np.asarray(jax.jacrev(lambda z: model_fn(cnn.unravel(z)))(cnn.flat)).reshape(-1, cnn.flat.size)
    out = model_fn(cnn.params)
    HL = np.asarray(jax.hessian(lambda o: loss_fn(o.reshape(out.shape)))(out.reshape(-1)))
    G = J.T @ HL @ J
    v = _rand(jax.random.key(4), cnn.params)
    vf = np.asarray(ravel_pytree(v)[0])
    got = np.asarray(ravel_pytree(jax.jit(mv)(v))[0])
    np.testing.assert_allclose(got, G @ vf, atol=1e-5 * np.linalg.norm(G @ vf))
    assert vf @ got >= 0
    assert np.linalg.eigvalsh((G + G.T) / 2).min() > -1e-6 * np.abs(G).max()


def test_dataset_hvp_equals_hvp_on_concatenated_data(cnn, digits):
    # Three batches of 8 rows with 8, 5 and 3 valid examples: padding masked, counts weight.
    x = jnp.asarray(digits.x_train[32:56]).reshape(3, 8, 8, 8, 1)
    y = jnp.asarray(digits.y_train[32:56]).reshape(3, 8)
    counts = jnp.array([8, 5, 3])
    mask = jnp.arange(8)[None, :] < counts[:, None]

    def batch_loss(p, batch):
        bx, by, bm = batch
        ce = optax.softmax_cross_entropy_with_integer_labels(cnn.model.apply({"params": p}, bx, train=False), by)
        return jnp.sum(ce * bm) / jnp.maximum(jnp.sum(bm), 1)

    f = hqjax.dataset_loss(batch_loss, (x, y, mask), counts)
    keep = np.asarray(mask).reshape(-1)
    xc, yc = x.reshape(24, 8, 8, 1)[keep], y.reshape(24)[keep]
    f_concat = lambda p: cnn.loss_xy(p, xc, yc)
    v = _rand(jax.random.key(5), cnn.params)
    np.testing.assert_allclose(f(cnn.params), f_concat(cnn.params), rtol=1e-6)
    got = ravel_pytree(jax.jit(lambda p, v: hqjax.hvp(f, p, v))(cnn.params, v))[0]
    want = ravel_pytree(jax.jit(lambda p, v: hqjax.hvp(f_concat, p, v))(cnn.params, v))[0]
    np.testing.assert_allclose(got, want, atol=1e-5 * np.linalg.norm(want))


def test_dataset_loss_rejects_empty_and_misshapen_data(cnn):
    loss = lambda p, b: jnp.mean(b[0])
    with pytest.raises(ValueError, match="empty dataset"):
        hqjax.dataset_loss(loss, (jnp.zeros((0, 4, 2)), jnp.zeros((0, 4))))
    with pytest.raises(ValueError, match="no batches"):
        hqjax.dataset_loss(loss, ())
    with pytest.raises(ValueError, match="one count per batch"):
        hqjax.dataset_loss(loss, (jnp.zeros((2, 4, 2)),), counts=[1, 2, 3])
    with pytest.raises(ValueError, match="positive sum"):
        hqjax.dataset_loss(loss, (jnp.zeros((2, 4, 2)),), counts=[0, 0])


def test_nan_loss_and_structure_mismatch_raise_clear_errors(cnn):
    bad = jax.tree.map(lambda x: x * jnp.nan, cnn.params)
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        hqjax.hessian(cnn.loss, bad)
    with pytest.raises(FloatingPointError, match="gradient of the loss is not finite"):
        hqjax.hessian(cnn.loss, bad, linearize=True)
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        hqjax.ggn(lambda p: cnn.model.apply({"params": p}, cnn.x, train=False), lambda o: jnp.sum(o), bad)
    wrong = {k: v for k, v in cnn.params.items() if k != "dense"}
    with pytest.raises(ValueError, match="only in params: \\['dense/bias', 'dense/kernel'\\]"):
        hqjax.hvp(cnn.loss, cnn.params, wrong)
    wrong_shape = jax.tree.map(lambda x: x, cnn.params)
    wrong_shape["conv1"] = dict(wrong_shape["conv1"], bias=jnp.zeros(5))
    with pytest.raises(ValueError, match="conv1/bias"):
        cnn.matvec(wrong_shape)
