"""Integer-only inference against the fake-quant model (hqjax/quant/integer.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax
import hqjax.kernels
from hqjax.models import CifarResNet
from hqjax.quant.integer import int_matmul, load_integer_model, save_integer_model, to_integer
from hqjax.quant.transform import quantize_model

FLOAT = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
# an IntegerModel is a pytree with its backend static: one compile per (backend, shapes, arrays
# layout), shared by every test of this module
_forward = jax.jit(lambda model, q: model.forward(q))


def _convert(model, variables, digits, w_bits, a_bits=8):
    names = hqjax.blocks(variables["params"]).names
    qm = quantize_model(model, hqjax.uniform_bit_config(names, w_bits, a_bits))
    vq = jax.jit(qm.calibrate)(variables, digits.x_train[:512])
    return qm, vq, to_integer(qm, vq, digits.x_train.shape[1:])


@pytest.fixture(scope="module", params=[("cnn", 8), ("cnn", 4), ("mlp", 8), ("mlp", 4)], ids=lambda p: f"{p[0]}-W{p[1]}A8")
def converted(request, trained_cnn, trained_mlp, digits):
    model, variables = {"cnn": trained_cnn, "mlp": trained_mlp}[request.param[0]]
    return _convert(model, variables, digits, request.param[1])


def test_integer_matches_fake_quant_on_digits(converted, digits, acc):
    qm, vq, im = converted
    fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    # im(x) is exactly this composition; jitting forward alone shares its compile with the
    # serialization, int4 and backend tests below (the ResNet test jits __call__ itself)
    il = np.asarray(im.dequantize_output(_forward(im, im.quantize_input(digits.x_test))))
    agree = np.mean(fq.argmax(-1) == il.argmax(-1))
    assert agree >= 0.999, agree
    lsb = np.abs(fq).max() / 127  # the 8-bit output scale
    assert np.abs(fq - il).max() <= lsb
    assert acc(il, digits.y_test) > 0.9


def _all_eqns(jaxpr):
    """Every equation, recursing once into each sub-jaxpr (the kernels' ``jit``s nest one)."""
    for eqn in jaxpr.eqns:
        yield eqn
        subs = list(jax.core.jaxprs_in_params(eqn.params)) if hasattr(jax.core, "jaxprs_in_params") else []
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None:
                subs.append(getattr(inner, "jaxpr", inner))
        seen = set()
        for sub in subs:
            if id(sub) not in seen:
                seen.add(id(sub))
                yield from _all_eqns(sub)


def test_integer_path_has_int8_dots_and_no_float(converted, digits):
    _, _, im = converted
    q = im.quantize_input(digits.x_test[:4])
    assert q.dtype == jnp.int8
    jaxpr = jax.make_jaxpr(im.forward)(q).jaxpr
    eqns = list(_all_eqns(jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == len(im.meta["layers"])
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.int8, jnp.int8]
        assert e.outvars[0].aval.dtype == jnp.int32
    floats = [(e.primitive.name, v.aval.dtype) for e in eqns for v in (*e.invars, *e.outvars)
              if hasattr(v, "aval") and v.aval.dtype in FLOAT]
    assert not floats, floats[:5]
    assert "conv" not in {e.primitive.name for e in eqns}


def test_serialized_model_predicts_the_same(converted, digits, tmp_path):
    _, _, im = converted
    save_integer_model(im, tmp_path / "im")
    back = load_integer_model(tmp_path / "im")
    q = im.quantize_input(digits.x_test)
    np.testing.assert_array_equal(np.asarray(_forward(back, q)), np.asarray(_forward(im, q)))
    assert back.meta["bit_config"] == im.meta["bit_config"]


@pytest.mark.parametrize("converted", [("cnn", 8), ("cnn", 4)], indirect=True, ids=["cnn-W8A8", "cnn-W4A8"])
def test_integer_outputs_identical_on_every_backend(converted, digits):
    """Issue 6: every product (convolutions as im2col) goes through hqjax.kernels, so the
    backend changes no integer. The Pallas backends run interpreted here (off GPU/TPU)."""
    _, _, im = converted
    q = im.quantize_input(digits.x_test)
    want = np.asarray(_forward(im, q))[:2]  # rows are independent: compiled once, for all of x_test
    q = q[:2]
    for b in ("triton", "mosaic"):  # the backend really reaches a Pallas kernel per layer
        eqns = _all_eqns(jax.make_jaxpr(im.replace(backend=b).forward)(q).jaxpr)
        assert sum(e.primitive.name == "pallas_call" for e in eqns) == len(im.meta["layers"])
    assert im.backend == "xla" and want.dtype == np.int32 and np.abs(want).max() > 0
    for b in ("triton", "mosaic"):
        np.testing.assert_array_equal(np.asarray(_forward(im.replace(backend=b), q)), want,
                                      err_msg=f"backend {b!r}")


@pytest.mark.parametrize("converted", [("cnn", 4)], indirect=True, ids=["cnn-W4A8"])
def test_int4_weights_are_packed_and_give_the_same_integers(converted, digits):
    qm, vq, im = converted
    unpacked = to_integer(qm, vq, digits.x_train.shape[1:], pack_int4=False)
    for name in im.meta["layers"]:
        rec, w = im.arrays[name], unpacked.arrays[name]["w"]
        assert "w" not in rec and rec["w4"].shape == ((w.shape[0] + 1) // 2, w.shape[1])
        np.testing.assert_array_equal(np.asarray(hqjax.kernels.unpack_int4(rec["w4"], w.shape[0])), np.asarray(w))
    q = im.quantize_input(digits.x_test)
    np.testing.assert_array_equal(np.asarray(_forward(im, q)), np.asarray(_forward(unpacked, q)))


@pytest.mark.slow
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_integer_matches_fake_quant(shortcut, digits, init_np):
    model = CifarResNet(depth=8, width=8, shortcut=shortcut)
    x = digits.x_train[:256]
    v = init_np(model, x[:2], seed=1)
    # non-trivial BatchNorm statistics and scales (some negative), so folding matters
    rng = np.random.default_rng(0)
    def perturb(path, a):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return (rng.uniform(0.5, 1.5, a.shape) * rng.choice([-1, 1, 1, 1], a.shape)).astype(a.dtype)
        if name == "var":
            return rng.uniform(0.5, 2.0, a.shape).astype(a.dtype)
        if name in ("mean", "bias"):
            return rng.normal(0, 0.2, a.shape).astype(a.dtype)
        return a
    v = jax.tree_util.tree_map_with_path(perturb, v)
    qm, vq, im = _convert(model, v, digits, 8)
    fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    il = np.asarray(jax.jit(im.__call__)(digits.x_test))
    lsb = np.abs(fq).max() / 127
    # residual adds happen in int32 at the finer branch scale, on the same (unrequantized)
    # block input the fake-quant model adds: logits agree to requantization rounding
    assert np.mean(np.abs(fq - il) <= lsb) >= 0.999
    assert np.mean(fq.argmax(-1) == il.argmax(-1)) >= 0.999


def test_int_matmul_contract_and_errors():
    a = jnp.asarray(np.random.default_rng(0).integers(-128, 128, (2, 3, 5)), jnp.int8)
    b = jnp.asarray(np.random.default_rng(1).integers(-8, 8, (5, 4)), jnp.int8)
    out = int_matmul(a, b)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(a, np.int64) @ np.asarray(b, np.int64))
    with pytest.raises(TypeError, match="int8 operands"):
        int_matmul(a.astype(jnp.int32), b)


def test_missing_act_bits_raise(trained_cnn, digits):
    model, v = trained_cnn
    cfg = hqjax.uniform_bit_config(["conv1", "conv2", "dense"], 8, 8)
    cfg["conv2"]["act_bits"] = None
    qm = quantize_model(model, cfg)
    vq = jax.jit(qm.calibrate)(v, digits.x_train[:64])
    with pytest.raises(ValueError, match=r"act_bits=None: \['conv2'\]"):
        to_integer(qm, vq, (8, 8, 1))


@pytest.mark.parametrize("name", ["resnet20", "projection_resnet"])
def test_configurations_of_one_network_share_one_compiled_program(name, digits, init_np):
    """With share_program, activation widths following the weights (W8A8, W4A4, W3A4) and
    weight-only changes change the integers, not the program: zero points, shifts and ranges
    are array arguments, both branches of a residual add are rescaled and array shapes never
    depend on which scales happen to be equal, so a sweep compiles the integer forward once
    per network. The lean program (the default) computes the same integers."""
    import user_models as um
    from hqjax.models import ResNet20
    from hqjax.quant import integer

    model = ResNet20(num_classes=10) if name == "resnet20" else um.ProjectionResNet()
    v = init_np(model, digits.x_train[:2], seed=4)
    names = hqjax.blocks(v["params"]).names
    programs, outputs, compiled = set(), [], 0
    for w, a in [(8, 8), (4, 4), (2, 8), (3, 4)]:
        cfg = {n: {"weight_bits": w if 0 < i < len(names) - 1 else 8, "act_bits": a} for i, n in enumerate(names)}
        qm = quantize_model(model, cfg)
        vq = jax.jit(lambda v, x: qm.calibrate(v, x, train=False))(v, digits.x_train[:128])
        im = to_integer(qm, vq, (8, 8, 1), pack_int4=False, share_program=True)
        programs.add(im.meta_json.split('"output_reg"')[0])  # the steps, before the per-model metadata
        before = integer._forward._cache_size()
        outputs.append(np.asarray(im(digits.x_test[:32])))
        compiled += integer._forward._cache_size() - before
        lean = to_integer(qm, vq, (8, 8, 1), pack_int4=False)  # fewer steps, the same integers
        np.testing.assert_array_equal(np.asarray(lean.forward(lean.quantize_input(digits.x_test[:32]))),
                                      np.asarray(im.forward(im.quantize_input(digits.x_test[:32]))))
        fq = np.asarray(qm.apply(vq, digits.x_test[:32], train=False))
        assert np.mean(fq.argmax(-1) == outputs[-1].argmax(-1)) >= 0.9
    assert len(programs) == 1
    assert compiled <= 1
    assert not np.allclose(outputs[0], outputs[1])  # the configurations differ in their integers


def test_layers_of_a_stack_are_refused_in_one_line():
    import user_models as um

    model = um.ScanMLP()
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (8, 8, 8, 1)), jnp.float32)
    v = model.init(jax.random.key(0), x[:2])
    cfg = {"embed": {"weight_bits": 8, "act_bits": 8}, "head": {"weight_bits": 8, "act_bits": 8},
           **{f"blocks/{f}[{i}]": {"weight_bits": 4, "act_bits": None} for i in range(3) for f in ("fc1", "fc2")}}
    qm = quantize_model(model, cfg)
    with pytest.raises(ValueError, match=r"cannot lower the layers of a stacked module.*blocks/fc1\[0\]"):
        to_integer(qm, qm.calibrate(v, x), (8, 8, 1))
