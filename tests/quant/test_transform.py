"""Flax transforms: quantize_params, coverage and quantize_model (hqjax/quant/transform.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hqjax
from hqjax.models import CNN, CifarResNet
from hqjax.quant.quantizers import QuantSpec, fake_quant
from hqjax.quant.transform import coverage, group_wise_weights, quantize_model, quantize_params

X = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)), jnp.float32)


@pytest.fixture(scope="module")
def cnn(init_np):
    model = CNN()
    return model, init_np(model, X[:2])


def test_quantize_params_touches_only_configured_kernels(cnn):
    _, v = cnn
    cfg = {"conv2": {"weight_bits": 3, "act_bits": None}}
    q = quantize_params(v["params"], cfg)
    w = v["params"]["conv2"]["kernel"]
    np.testing.assert_array_equal(q["conv2"]["kernel"], fake_quant(w, QuantSpec(bits=3, axis=-1)))
    assert len(np.unique(np.asarray(q["conv2"]["kernel"][..., 0]))) <= 7
    for other in (("conv1", "kernel"), ("dense", "kernel"), ("conv2", "bias")):
        np.testing.assert_array_equal(q[other[0]][other[1]], v["params"][other[0]][other[1]])


def test_coverage_reports_unmatched_and_uncovered(cnn):
    _, v = cnn
    cov = coverage(v["params"], {"conv1": {"weight_bits": 4, "act_bits": 8}, "conv7": {"weight_bits": 4, "act_bits": 8}})
    assert cov.matched == ("conv1",) and cov.unmatched == ("conv7",) and cov.uncovered == ("conv2", "dense")
    with pytest.raises(ValueError, match=r"\['conv7'\] match no layer.*'conv1', 'conv2', 'dense'"):
        quantize_params(v["params"], {"conv7": {"weight_bits": 4, "act_bits": 8}})


def test_group_wise_weight_spec():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(6, 12)), jnp.float32)
    params = {"attn": {"query": {"kernel": w}}, "ffn": {"kernel": w}}
    cfg = {"attn/query": {"weight_bits": 4, "act_bits": None}, "ffn": {"weight_bits": 4, "act_bits": None}}
    q = quantize_params(params, cfg, group_wise_weights(4, layers=lambda name: name.startswith("attn")))
    np.testing.assert_array_equal(q["attn"]["query"]["kernel"], fake_quant(w, QuantSpec(bits=4, axis=-1, group_size=4)))
    np.testing.assert_array_equal(q["ffn"]["kernel"], fake_quant(w, QuantSpec(bits=4, axis=-1)))


def test_attention_projection_kernels_are_quantized_per_output_feature_and_head():
    """A ``(in, heads, head_dim)`` kernel with its ``(heads, head_dim)`` bias (DenseGeneral,
    LinearGeneral, Flax's attention) is quantized as its ``(in, heads * head_dim)`` matrix:
    per-channel is per (head, dim) feature and group-wise by head_dim is one scale per head,
    exactly as the same weights in a plain Dense layer. Without a bias the last axis is the
    channel axis, as before."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(6, 3, 4)) * rng.uniform(0.1, 3.0, size=(1, 3, 4)), jnp.float32)
    b = jnp.zeros((3, 4), jnp.float32)
    general = {"q": {"kernel": w, "bias": b}, "o": {"kernel": jnp.moveaxis(w, 0, -1), "bias": jnp.zeros(6)}}
    dense = {"q": {"kernel": w.reshape(6, 12), "bias": b.reshape(12)},
             "o": {"kernel": jnp.moveaxis(w, 0, -1).reshape(12, 6), "bias": jnp.zeros(6)}}
    cfg = {"q": {"weight_bits": 3, "act_bits": None}, "o": {"weight_bits": 3, "act_bits": None}}
    for spec in (hqjax.per_channel_weights, group_wise_weights(4)):
        qg, qd = quantize_params(general, cfg, spec), quantize_params(dense, cfg, spec)
        np.testing.assert_array_equal(qg["q"]["kernel"], qd["q"]["kernel"].reshape(6, 3, 4))
        np.testing.assert_array_equal(qg["o"]["kernel"], qd["o"]["kernel"].reshape(3, 4, 6))
    # group-wise by head_dim: one scale per head (the largest |w| of the head maps to the top level)
    qh = np.asarray(quantize_params(general, cfg, group_wise_weights(4))["q"]["kernel"])
    for h in range(3):
        steps = np.unique(np.abs(qh[:, h]))
        np.testing.assert_allclose(steps / steps.max() * 3, np.round(steps / steps.max() * 3), atol=1e-5)
        assert np.isclose(steps.max(), np.abs(np.asarray(w)[:, h]).max(), rtol=1e-6)
    no_bias = {"q": {"kernel": w}}
    np.testing.assert_array_equal(quantize_params(no_bias, {"q": cfg["q"]})["q"]["kernel"],
                                  fake_quant(w, QuantSpec(bits=3, axis=-1)))


def test_act_quant_without_calibration_raises(cnn):
    model, v = cnn
    qm = quantize_model(model, hqjax.uniform_bit_config(["conv1", "conv2", "dense"], 4, 8))
    with pytest.raises(ValueError, match="layer 'conv1' has act_bits=8 but no calibrated input range"):
        qm.apply(v, X)


def test_unknown_layer_raises_at_construction(cnn):
    model, v = cnn
    with pytest.raises(ValueError, match="match no layer"):
        quantize_model(model, {"Conv_0": {"weight_bits": 4, "act_bits": 8}}, params=v["params"])


def test_calibrated_model_quantizes_inputs_and_weights(cnn):
    model, v = cnn
    cfg = hqjax.uniform_bit_config(["conv1", "conv2", "dense"], 4, 2)
    qm = quantize_model(model, cfg)
    vq = jax.jit(qm.calibrate)(v, X)
    assert float(vq["quant_stats"]["conv1"]["input"]["max"]) == float(X.max())
    # reference: the same network written by hand with the quantizers
    p = quantize_params(v["params"], cfg)
    st = vq["quant_stats"]
    a = QuantSpec(bits=2, mode="asymmetric")
    fq = lambda x, n: fake_quant(x, a, (st[n]["input"]["min"], st[n]["input"]["max"]))
    conv = lambda x, n, s: jax.lax.conv_general_dilated(x, p[n]["kernel"], (s, s), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + p[n]["bias"]
    h = jax.nn.relu(conv(fq(X, "conv1"), "conv1", 1))
    h = jax.nn.relu(conv(fq(h, "conv2"), "conv2", 2)).reshape(len(X), -1)
    ref = fq(h, "dense") @ p["dense"]["kernel"] + p["dense"]["bias"]
    np.testing.assert_allclose(np.asarray(jax.jit(qm.apply)(vq, X)), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(qm.apply(vq, X)), np.asarray(model.apply(v, X)), atol=1e-3)


def test_grad_flows_through_ste_and_optax_loop(cnn):
    model, v = cnn
    qm = quantize_model(model, hqjax.uniform_bit_config(["conv1", "conv2", "dense"], 4, 8))
    vq = qm.calibrate(v, X)
    y = jnp.arange(len(X)) % 10
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(qm.apply({**vq, "params": p}, X), y).mean()
    g = jax.jit(jax.grad(loss))(vq["params"])
    assert all(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(g))
    opt = optax.sgd(0.1)
    step = jax.jit(lambda p, s: (lambda u: (optax.apply_updates(p, u[0]), u[1]))(opt.update(jax.grad(loss)(p), s, p)))
    p, s = vq["params"], opt.init(vq["params"])
    l0 = float(loss(p))
    for _ in range(5):
        p, s = step(p, s)
    assert float(loss(p)) < l0


def test_resnet_batchnorm_train_mode_and_paths(init_np):
    model = CifarResNet(depth=8, width=4)
    v = init_np(model, X[:2])
    names = hqjax.blocks(v["params"]).names
    assert "stage2/block0/conv1" in names
    qm = quantize_model(model, hqjax.uniform_bit_config(names, 4, 8), params=v["params"])
    vq = jax.jit(qm.calibrate)(v, X)
    assert "stage3/block0" in vq["quant_stats"] and "conv2" in vq["quant_stats"]["stage3/block0"]
    out, new = jax.jit(lambda v, x: qm.apply(v, x, train=True, mutable=["batch_stats"]))(vq, X)
    assert out.shape == (16, 10)
    assert not np.allclose(np.asarray(new["batch_stats"]["stem_bn"]["mean"]), np.asarray(v["batch_stats"]["stem_bn"]["mean"]))


# --------------------------------------------------------------------------- stacked layers
@pytest.fixture(scope="module")
def scanned():
    import user_models as um

    model = um.ScanMLP()
    return model, model.init(jax.random.key(0), X[:2])


def _stack_cfg(bits=(2, 8, 4)):
    cfg = {f"blocks/fc1[{i}]": {"weight_bits": b, "act_bits": None} for i, b in enumerate(bits)}
    return {**cfg, "head": {"weight_bits": 3, "act_bits": None}}


def test_each_layer_of_a_stack_is_quantized_at_its_own_width(scanned):
    _, v = scanned
    q = quantize_params(v["params"], _stack_cfg())
    w = v["params"]["blocks"]["fc1"]["kernel"]
    for i, b in enumerate((2, 8, 4)):  # per layer and per output channel of that layer
        np.testing.assert_array_equal(q["blocks"]["fc1"]["kernel"][i], fake_quant(w[i], QuantSpec(bits=b, axis=-1)))
    np.testing.assert_array_equal(q["blocks"]["fc2"]["kernel"], v["params"]["blocks"]["fc2"]["kernel"])
    np.testing.assert_array_equal(q["head"]["kernel"], fake_quant(v["params"]["head"]["kernel"], QuantSpec(bits=3, axis=-1)))
    assert hqjax.quant.weight_specs(v["params"], _stack_cfg())["blocks/fc1[0]"].bits == 2
    cov = coverage(v["params"], _stack_cfg())
    assert "blocks/fc1[2]" in cov.matched and cov.uncovered == ("blocks/fc2", "embed")
    # straight-through gradients reach every layer's float weights
    g = jax.grad(lambda p: jnp.sum(quantize_params(p, _stack_cfg())["blocks"]["fc1"]["kernel"] ** 2))(v["params"])
    np.testing.assert_allclose(g["blocks"]["fc1"]["kernel"], 2 * q["blocks"]["fc1"]["kernel"], rtol=1e-6)


def test_weight_only_model_of_a_stack_and_what_it_refuses(scanned):
    model, v = scanned
    qm = quantize_model(model, _stack_cfg())
    want = model.apply({"params": quantize_params(v["params"], _stack_cfg())}, X)
    np.testing.assert_allclose(qm.apply(v, X), want, rtol=1e-6)
    assert not np.allclose(want, model.apply(v, X), atol=1e-3)
    with pytest.raises(ValueError, match=r"blocks/fc1\[0\].*act_bits set.*act_bits=None"):
        quantize_model(model, {"blocks/fc1[0]": {"weight_bits": 4, "act_bits": 8}})
    with pytest.raises(ValueError, match="names both the stack"):
        quantize_params(v["params"], {**_stack_cfg(), "blocks/fc1": {"weight_bits": 4, "act_bits": None}})
    with pytest.raises(ValueError, match=r"no layer 3 along a leading layer axis"):
        quantize_params(v["params"], {"blocks/fc1[3]": {"weight_bits": 4, "act_bits": None}})
    whole = quantize_model(model, {"blocks/fc1": {"weight_bits": 4, "act_bits": 8}})
    with pytest.raises(ValueError, match=r"'blocks/fc1'.*inside a Flax lifted transform.*act_bits=None"):
        whole.calibrate(v, X)
