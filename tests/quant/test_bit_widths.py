"""Bit widths as array inputs (``hqjax.bit_width_arrays``): one compiled model for every
configuration of a sweep, with the numbers of the model quantized per configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hqjax
from hqjax.quant.quantizers import QuantSpec, fake_quant
from tests.user_models import NNXCNN, ProjectionResNet, init_linen

_X = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)).astype(np.float32)
_Y = np.arange(16) % 10


def _configs(names, n, seed=0, act=(4, 8)):
    rng = np.random.default_rng(seed)
    return [{l: {"weight_bits": int(rng.choice([2, 3, 4, 8])), "act_bits": int(rng.choice(act))} for l in names}
            for _ in range(n)]


@pytest.mark.parametrize("mode,axis,group", [("symmetric", -1, None), ("symmetric", -1, 2),
                                             ("asymmetric", None, None), ("unsigned", None, None)])
def test_fake_quant_with_a_traced_width_equals_the_static_quantizer(mode, axis, group):
    x = jax.random.normal(jax.random.key(1), (5, 6)) * 3
    spec = QuantSpec(bits=8, mode=mode, axis=axis, group_size=group)
    traced = jax.jit(lambda x, b: fake_quant(x, spec, bits=b))
    for b in (2, 3, 4, 5, 6, 7, 8):
        want = fake_quant(x, QuantSpec(bits=b, mode=mode, axis=axis, group_size=group))
        np.testing.assert_array_equal(traced(x, jnp.int32(b)), want)
        # the straight-through gradient is the identity at any width
        g = jax.grad(lambda x: jnp.sum(fake_quant(x, spec, bits=jnp.int32(b)) * x))(x)
        np.testing.assert_allclose(g, fake_quant(x, QuantSpec(bits=b, mode=mode, axis=axis, group_size=group)) + x,
                                   rtol=1e-6)


def test_linen_model_with_bit_width_arrays_equals_the_model_quantized_per_configuration():
    model = ProjectionResNet()
    v = init_linen(model)
    names = list(hqjax.blocks(v["params"]).names)
    template = hqjax.quantize_model(model, hqjax.uniform_bit_config(names, 8, 8))
    traces = []

    def run(v, bw, x):
        traces.append(1)
        cal = template.calibrate(v, x, bit_widths=bw)
        return cal, template.apply(cal, x, bit_widths=bw)

    run = jax.jit(run)
    for cfg in _configs(names, 3):
        qm = hqjax.quantize_model(model, cfg)
        cal = qm.calibrate(v, _X)
        got_cal, got = run(v, hqjax.bit_width_arrays(cfg), _X)
        jax.tree.map(np.testing.assert_array_equal, got_cal["quant_stats"], cal["quant_stats"])
        np.testing.assert_allclose(got, qm.apply(cal, _X), rtol=1e-5, atol=1e-5)
    assert len(traces) == 1  # one compiled function for every configuration


def test_qat_state_with_bit_widths_trains_like_the_static_configuration():
    model = ProjectionResNet()
    v = init_linen(model)
    names = list(hqjax.blocks(v["params"]).names)
    cfg = _configs(names, 1, seed=3)[0]
    opt = optax.sgd(0.05)
    static = hqjax.quantize_model(model, cfg)
    template = hqjax.quantize_model(model, hqjax.uniform_bit_config(names, 8, 8))
    cal = static.calibrate(v, _X)
    a = hqjax.init_qat_state(cal, opt)
    b = hqjax.init_qat_state(cal, opt, bit_widths=hqjax.bit_width_arrays(cfg))
    step_a = jax.jit(hqjax.make_qat_step(static, opt, batchnorm="freeze"))
    step_b = jax.jit(hqjax.make_qat_step(template, opt, batchnorm="freeze"))
    c = hqjax.init_qat_state(cal, opt)  # the template's own 8-bit widths: must differ
    for _ in range(2):
        a, ma = step_a(a, _X, _Y)
        b, mb = step_b(b, _X, _Y)
        c, mc = jax.jit(hqjax.make_qat_step(template, opt, batchnorm="freeze"))(c, _X, _Y)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
    assert abs(float(mc["loss"]) - float(ma["loss"])) > 1e-3
    # two compiled programs may round a tie differently in one element: close, not bit-equal
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-3, atol=1e-4), b.params, a.params)
    # a state of another configuration runs through the same compiled step
    other = hqjax.init_qat_state(cal, opt, bit_widths=hqjax.bit_width_arrays(_configs(names, 1, seed=4)[0]))
    before = step_b._cache_size()
    step_b(other, _X, _Y)
    assert step_b._cache_size() == before


def test_nnx_models_with_bit_width_arrays_equal_the_model_quantized_per_configuration():
    from flax import nnx

    module = NNXCNN(nnx.Rngs(0))
    names = ["conv1", "conv2", "head"]
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    template = hqjax.quantize_nnx_model(module, hqjax.uniform_bit_config(names, 8, 8))
    apply_template = hqjax.quantize_model(module, hqjax.uniform_bit_config(names, 8, 8))  # Linen convention
    fn = jax.jit(lambda p, r, bw, x: template.apply(p, r, template.calibrate(p, r, None, x, bit_widths=bw), x,
                                                    bit_widths=bw))
    for cfg in _configs(names, 2, seed=5):
        bw = hqjax.bit_width_arrays(cfg)
        qm = hqjax.quantize_nnx_model(module, cfg)
        want = qm.apply(params, rest, qm.calibrate(params, rest, None, _X), _X)
        np.testing.assert_allclose(fn(params, rest, bw, _X), want, rtol=1e-5, atol=1e-5)
        model, variables = hqjax.from_nnx(module)
        variables = apply_template.calibrate(variables, _X, bit_widths=bw)
        np.testing.assert_allclose(apply_template.apply(variables, _X, bit_widths=bw), want, rtol=1e-5, atol=1e-5)


def test_bit_widths_that_do_not_match_the_model_raise():
    model = ProjectionResNet()
    v = init_linen(model)
    names = list(hqjax.blocks(v["params"]).names)
    qm = hqjax.quantize_model(model, hqjax.uniform_bit_config(names, 8, 8))
    cal = qm.calibrate(v, _X)
    with pytest.raises(ValueError, match="bit_width_arrays"):
        qm.apply(cal, _X, bit_widths=hqjax.bit_width_arrays(hqjax.uniform_bit_config(names[:-1], 4, 8)))
    with pytest.raises(ValueError, match="act_bits must be None"):
        qm.apply(cal, _X, bit_widths=hqjax.bit_width_arrays(hqjax.uniform_bit_config(names, 4, None)))
    mse = hqjax.quantize_model(model, hqjax.uniform_bit_config(names, 8, 8), calibrator="mse")
    with pytest.raises(ValueError, match="'mse' calibrator"):
        mse.calibrate(v, _X, bit_widths=hqjax.bit_width_arrays(hqjax.uniform_bit_config(names, 4, 8)))
