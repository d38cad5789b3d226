"""BertTiny and Q-BERT-style group-wise fake quantization end to end (models/bert.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hqjax
from hqjax.models import MODELS, BertTiny, get_model
from hqjax.quant.quantizers import QuantSpec, weight_perturbation
from hqjax.quant.transform import group_wise_weights, quantize_model, weight_specs

LENGTH, MARK = 12, 3


def _task(n, seed):
    """Label 1 when the marker token appears in the (unpadded part of the) sequence."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 64, (n, LENGTH))
    y = rng.integers(0, 2, n)
    pos = rng.integers(1, LENGTH - 2, n)
    ids[y == 1, pos[y == 1]] = MARK
    ids[:, -2:] = np.where(rng.random((n, 2)) < 0.5, 0, ids[:, -2:])  # some padding
    ids[:, 0] = 1  # [CLS]
    return jnp.asarray(ids, jnp.int32), jnp.asarray(y, jnp.int32)


@pytest.fixture(scope="module")
def trained_bert():
    model = get_model("bert_tiny", num_classes=2)
    x, y = _task(1024, 0)
    # NumPy draws on eval_shape's shapes: compiling model.init's RNG costs more than training
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:2]))["params"]
    rng = np.random.default_rng(0)
    init = lambda p, t: (np.ones(t.shape, t.dtype) if str(p[-1].key) == "scale" else np.zeros(t.shape, t.dtype)
                         if str(p[-1].key) == "bias" else (0.1 * rng.normal(size=t.shape)).astype(t.dtype))
    params = jax.tree_util.tree_map_with_path(init, shapes)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for i in range(150):
        j = (i * 64) % 1024
        params, s = step(params, s, x[j:j + 64], y[j:j + 64])
    return model, {"params": params}


def test_registry_and_layer_paths():
    assert MODELS["bert_tiny"] is BertTiny and "cnn" in MODELS and "resnet20" in MODELS
    model = BertTiny()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
    names = hqjax.blocks(shapes["params"]).names
    for n in ("embed/token", "embed/position", "encoder/layer0/attention/query", "encoder/layer1/ffn/intermediate",
              "classifier"):
        assert n in names
    with pytest.raises(ValueError, match="length <= 32"):
        model.init(jax.random.key(0), jnp.ones((1, 40), jnp.int32))


def test_padding_tokens_do_not_change_the_output(trained_bert):
    model, v = trained_bert
    x, _ = _task(8, 5)
    x = x.at[:, -2:].set(0)
    apply = jax.jit(model.apply)
    a = apply(v, x)
    # changing a padded position's embedding must not leak through the attention mask
    moved = jax.tree.map(lambda t: t, v)
    moved["params"]["embed/position"]["embedding"] = v["params"]["embed/position"]["embedding"].at[-1].add(jnp.linspace(-3.0, 3.0, 32))
    np.testing.assert_allclose(np.asarray(apply(moved, x)), np.asarray(a), atol=1e-5)
    # while changing an unpadded one does
    moved["params"]["embed/position"]["embedding"] = v["params"]["embed/position"]["embedding"].at[2].add(jnp.linspace(-3.0, 3.0, 32))
    assert not np.allclose(np.asarray(apply(moved, x)), np.asarray(a), atol=1e-3)


def test_qbert_group_wise_fake_quant_end_to_end(trained_bert):
    model, v = trained_bert
    x, y = _task(512, 1)
    names = hqjax.blocks(v["params"]).names
    head_dim = model.hidden // model.num_heads
    grouped = lambda n: "/attention/" in n or "/ffn/" in n
    spec = group_wise_weights(head_dim, layers=grouped)
    specs = weight_specs(v["params"], hqjax.uniform_bit_config(names, 8, 8), spec)
    assert specs["encoder/layer0/attention/query"] == QuantSpec(bits=8, axis=-1, group_size=head_dim)
    assert specs["embed/token"].axis == 0  # one scale per token row
    acc = lambda logits: float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y)))
    fp = acc(model.apply(v, x))
    assert fp > 0.9
    qm = quantize_model(model, hqjax.uniform_bit_config(names, 8, 8), weight_spec=spec, params=v["params"])
    vq = jax.jit(qm.calibrate)(v, x[:256])
    assert "query" in vq["quant_stats"]["encoder/layer0"]["attention"]
    assert "embed/token" not in vq["quant_stats"]  # embedding lookups take ids, not activations
    w8 = np.asarray(jax.jit(qm.apply)(vq, x))
    assert acc(w8) >= fp - 0.01
    assert not np.array_equal(w8, np.asarray(model.apply(v, x)))


def test_more_groups_mean_smaller_perturbation(trained_bert):
    _, v = trained_bert
    w = v["params"]["encoder/layer0"]["attention"]["value"]["kernel"]
    per_tensor = float(weight_perturbation(w, 4, axis=None))
    per_head = float(weight_perturbation(w, 4, group_size=8))
    per_column = float(weight_perturbation(w, 4))
    assert per_tensor >= per_head >= per_column > 0
