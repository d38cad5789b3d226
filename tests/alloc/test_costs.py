"""Layer shapes and costs traced from real Flax models."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax
from hqjax.models import CNN


@pytest.fixture(scope="module")
def cnn():
    model = CNN()
    x = jnp.zeros((2, 8, 8, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))  # shapes suffice
    return model, variables, x


def test_cnn_shapes_and_macs_from_the_trace(cnn):
    model, variables, x = cnn
    shapes = hqjax.layer_shapes(model, variables, x, train=False)
    assert list(shapes) == ["conv1", "conv2", "dense"]
    assert set(shapes) == set(hqjax.blocks(variables["params"]).names)
    # conv1: 8x8 outputs x 8 channels, each a 3x3x1 window; conv2 (stride 2): 4x4x16 outputs of
    # 3x3x8; dense: 10 outputs of 4*4*16 inputs.
    assert shapes["conv1"].macs == 8 * 8 * 8 * (3 * 3 * 1)
    assert shapes["conv2"].macs == 4 * 4 * 16 * (3 * 3 * 8)
    assert shapes["dense"].macs == 10 * 256
    assert shapes["conv2"].strides == (2, 2) and shapes["conv2"].output_shape == (2, 4, 4, 16)
    for name, s in shapes.items():
        kernel = hqjax.blocks(variables["params"]).kernel(variables["params"], name)
        assert s.n_weights == kernel.size and s.n_bias == kernel.shape[-1]


class GroupedAndAttention(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.Conv(12, (3, 3), strides=(2, 2), feature_group_count=3, padding="VALID", name="grouped")(x)
        y = y.reshape((y.shape[0], -1, 12))  # a sequence of 9 tokens of width 12
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6, name="attn")(y, y)
        tok = nn.Embed(50, 6, name="embed")(jnp.zeros((x.shape[0], 9), jnp.int32))
        return nn.DenseGeneral((2, 5), name="head")(y + tok)


def test_grouped_conv_attention_projections_and_embeddings():
    model = GroupedAndAttention()
    x = jnp.zeros((1, 7, 7, 6))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    shapes = hqjax.layer_shapes(model, variables, x)
    assert set(shapes) == set(hqjax.blocks(variables["params"]).names)
    # Grouped conv: 3x3 outputs x 12 channels, each over a 3x3 window of 6/3 input channels.
    assert shapes["grouped"].macs == 3 * 3 * 12 * (3 * 3 * 2)
    assert shapes["grouped"].feature_group_count == 3
    # Attention projections: 9 tokens, 12 -> 2 heads x 4 (q, k, v), then 2 x 4 -> 6 (out).
    for proj in ("query", "key", "value"):
        assert shapes[f"attn/{proj}"].macs == 9 * 12 * 8
    assert shapes["attn/out"].macs == 9 * 8 * 6
    assert shapes["embed"].macs == 0 and shapes["embed"].n_weights == 50 * 6
    assert shapes["head"].macs == 9 * 6 * 10


def test_size_and_bops_follow_their_definitions(cnn):
    model, variables, x = cnn
    costs = hqjax.LayerCosts.from_model(model, variables, x, train=False)
    assert costs.size_bytes("conv2", 4) == 1152 * 4 / 8 + 16 * 32 / 8
    assert costs.bops("dense", 4, 8) == 2560 * 32
    m = costs.matrix("bops", ["conv1", "dense"], [(2, 8), (8, 8)])
    np.testing.assert_array_equal(m, [[4608 * 16, 4608 * 64], [2560 * 16, 2560 * 64]])
    assert costs.matrix("size", ["conv2"], [(3, 3)])[0, 0] == costs.size_bytes("conv2", 3)
    with pytest.raises(ValueError, match="latency table"):
        costs.latency("conv1", 4, 4)
    with pytest.raises(KeyError, match="'conv9'"):
        costs.size_bytes("conv9", 4)


def test_latency_table_round_trip_and_lookup(tmp_path, cnn):
    model, variables, x = cnn
    table = {"conv1": {4: 1.5, 8: 2.0}, "conv2": {"w4a8": 3.0, "8": 4.0}, "dense": {"4": 0.5, "8": 0.7}}
    path = str(tmp_path / "lat.json")
    hqjax.save_latency_table(table, path)
    assert json.load(open(path))["conv1"] == {"4": 1.5, "8": 2.0}
    costs = hqjax.LayerCosts.from_model(model, variables, x, train=False).with_latency(path)
    assert costs.latency("conv1", 4, 4) == 1.5
    assert costs.latency("conv2", 4, 8) == 3.0 and costs.latency("conv2", 8, 8) == 4.0
    with pytest.raises(KeyError, match="w4a4"):
        costs.latency("conv2", 4, 4)


def test_measured_latency_table_covers_every_layer_and_bit(cnn):
    model, variables, x = cnn
    shapes = hqjax.layer_shapes(model, variables, x, train=False)
    table = hqjax.measure_latency_table(shapes, (4, 8, 16), repeats=3)
    assert set(table) == set(shapes)
    for row in table.values():
        assert set(row) == {"4", "8", "16"} and all(0 < v < 1e6 for v in row.values())
    costs = hqjax.LayerCosts.from_shapes(shapes).with_latency(table)
    assert costs.latency("dense", 8, 8) == table["dense"]["8"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_serial_op_computes_the_integer_product_exactly(cnn, bits):
    from hqjax.alloc import bit_serial_op
    from hqjax.alloc.costs import _reference_op

    model, variables, x = cnn
    rng = np.random.default_rng(bits)
    for name, shape in hqjax.layer_shapes(model, variables, x, train=False).items():
        fn, (a, k) = bit_serial_op(shape, bits)
        ref, _ = _reference_op(shape, 8)
        a = jnp.asarray(rng.integers(-128, 128, a.shape), jnp.int8)
        k = jnp.asarray(rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), k.shape), jnp.int8)
        np.testing.assert_array_equal(jax.jit(fn)(a, k), ref(a, k), err_msg=name)
        # one product per weight bit plane: the work, and so the time, grows with the width
        text = jax.jit(fn).lower(a, k).as_text()
        assert text.count("convolution" if shape.kind == "conv" else "dot_general") == bits, name


def test_layers_of_a_stack_are_costed_one_by_one_in_linen_and_nnx():
    """A scanned stack's layers see slices of params with a leading layer axis: each is a
    layer of its own, named as hqjax.blocks(params, stacked=...) names it."""
    import user_models as um
    from flax import nnx

    x = jnp.zeros((2, 8, 8, 1))
    linen = um.ScanMLP()
    v = linen.init(jax.random.key(0), x)
    nnx_model = um.NNXScanMLP(nnx.Rngs(0))
    layers = ["embed", *(f"blocks/{fc}[{i}]" for i in range(3) for fc in ("fc1", "fc2")), "head"]
    for model, args in ((linen, (v, x)), (nnx_model, (x,))):
        assert hqjax.stacked_modules(model, *args) == ("blocks",)
        shapes = hqjax.layer_shapes(model, *args)
        assert list(shapes) == layers
        assert all(shapes[n].kernel_shape == (16, 16) and shapes[n].macs == 256 for n in layers[1:-1])
    names = hqjax.blocks(v["params"], stacked=hqjax.stacked_modules(linen, v, x)).names
    assert set(names) == set(layers)
    costs = hqjax.LayerCosts.from_model(linen, v, x)
    assert costs.size_bytes("blocks/fc2[1]", 4) == 16 * 16 * 4 / 8 + 16 * 4
    # a model without stacks, and a conv whose kernel's leading axis is not a layer axis
    cnn = CNN(channels=(3, 6))
    assert hqjax.stacked_modules(cnn, cnn.init(jax.random.key(0), x), x) == ()


def test_einsum_layers_are_costed_like_dense_general_in_linen_and_nnx():
    import user_models as um

    x = jnp.zeros((2, 8, 8, 1))
    linen = um.EinsumNet()
    v = linen.init(jax.random.key(0), x)
    for shapes in (hqjax.layer_shapes(linen, v, x), hqjax.layer_shapes(um.nnx_einsum_net(), x)):
        s = shapes["heads"]
        assert (s.kind, s.kernel_shape, s.output_shape) == ("dense_general", (8, 2, 4), (2, 8, 2, 4))
        assert s.macs == 8 * 8 * 2 * 4 and s.n_weights == 64 and s.n_bias == 8  # 8 tokens x (8 in, 8 out)


def test_a_stacks_layers_are_timed_once():
    import user_models as um

    x = jnp.zeros((2, 8, 8, 1))
    model = um.ScanMLP()
    shapes = hqjax.layer_shapes(model, model.init(jax.random.key(0), x), x)
    calls = []

    def op(shape, bits):
        calls.append(shape.name)
        return (lambda a: a + 1), (jnp.zeros(3),)

    table = hqjax.measure_latency_table(shapes, [8], op=op, repeats=1)
    assert set(table) == set(shapes) and calls == ["embed", "blocks/fc1[0]", "blocks/fc2[0]", "head"]
    assert table["blocks/fc1[2]"] == table["blocks/fc1[0]"]



def test_nested_stacks_are_refused_by_layer():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(16, name="fc")(x), None

    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return scan(name="inner")(x, None)[0], None

    class Nested(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="outer")(x, None)[0]

    x = jnp.zeros((2, 16))
    model = Nested()
    with pytest.raises(ValueError, match=r"'outer/inner/fc' runs in nested stacks: .*\(3, 2, 16, 16\) carries 2"):
        hqjax.stacked_modules(model, model.init(jax.random.key(0), x), x)
