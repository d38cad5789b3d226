"""Integer lowering from the traced program (hqjax/quant/_lowering.py, _trace.py, _int_program.py)
on models hqjax does not ship (tests/user_models.py), Linen and NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hqjax
import user_models as um
from hqjax.quant.integer import load_integer_model, save_integer_model, to_integer
from hqjax.quant.nnx_transform import quantize_nnx_model
from hqjax.quant.transform import quantize_model

INT = (np.integer, np.bool_)


def _mixed(names):
    """Mixed precision: weights alternate 4 and 8 bits (the first layer 8), activations 8 bits."""
    return {n: {"weight_bits": 8 if i % 2 == 0 else 4, "act_bits": 8} for i, n in enumerate(names)}


def _agreement(fq, il):
    fq, il = np.asarray(fq), np.asarray(il)
    return float(np.mean(fq.argmax(-1) == il.argmax(-1)))


def _batches(digits, steps, seed, batch=64):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(digits.x_train), batch)
        yield digits.x_train[idx], digits.y_train[idx]


def train_linen(model, v, digits, steps=150, seed=0):
    """A few Adam steps (BatchNorm statistics updated as in training)."""
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, **stats}, x, train=True, mutable=list(stats))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
        grads, new = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), dict(new), opt_state

    params, stats = v["params"], {k: x for k, x in v.items() if k != "params"}
    opt_state = opt.init(params)
    for x, y in _batches(digits, steps, seed):
        params, stats, opt_state = step(params, stats, opt_state, x, y)
    return {"params": params, **stats}


def train_nnx(model, digits, steps=150, seed=0):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            nnx.merge(graphdef, p, rest, copy=True)(x), y).mean()
        updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for x, y in _batches(digits, steps, seed):
        params, opt_state = step(params, opt_state, x, y)
    return nnx.merge(graphdef, params, rest)


@pytest.fixture(scope="module")
def linen_lowered(digits, init_np):
    """Each Linen user model briefly trained, fake-quantized (mixed 4/8-bit weights, 8-bit
    activations), calibrated and lowered; cached for the module."""
    out = {}
    for name, cls in um.LINEN_MODELS.items():
        model = cls()
        v = train_linen(model, init_np(model, digits.x_train[:2], seed=1), digits)
        qm = quantize_model(model, _mixed(hqjax.blocks(v["params"]).names))
        vq = jax.jit(qm.calibrate)(v, digits.x_train[:512])
        out[name] = (qm, vq, to_integer(qm, vq, digits.x_train.shape[1:]))
    return out


@pytest.fixture(scope="module")
def nnx_lowered(digits):
    out = {}
    for name, cls in um.NNX_MODELS.items():
        model = train_nnx(cls(nnx.Rngs(0)), digits)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        names = sorted({"/".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(params) if p[-1] == "kernel"})
        qm = quantize_nnx_model(model, _mixed(names))
        stats = jax.jit(qm.calibrate)(params, rest, None, digits.x_train[:512])
        out[name] = (qm, (params, rest, stats), to_integer(qm, (params, rest, stats), digits.x_train.shape[1:]))
    return out


_run = jax.jit(lambda im, x: im(x))


@pytest.mark.slow  # trains and lowers each user model once (module fixture)
@pytest.mark.parametrize("name", sorted(um.LINEN_MODELS))
def test_linen_user_model_integer_matches_fake_quant(name, linen_lowered, digits, acc):
    qm, vq, im = linen_lowered[name]
    fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    il = np.asarray(_run(im, digits.x_test))
    assert acc(fq, digits.y_test) > 0.8  # trained: the agreement is not over one constant class
    assert _agreement(fq, il) >= 0.999
    print(f"{name}: integer argmax == fake-quant argmax on {_agreement(fq, il):.4f} of {len(fq)}")
    # logits differ only where some activation rounded to the neighbouring integer
    assert np.median(np.abs(fq - il)) <= np.abs(fq).max() / 127
    assert set(im.meta["layers"]) == set(qm.bit_config)


@pytest.mark.slow  # trains and lowers each user model once (module fixture)
@pytest.mark.parametrize("name", sorted(um.NNX_MODELS))
def test_nnx_user_model_integer_matches_fake_quant(name, nnx_lowered, digits, acc):
    qm, (params, rest, stats), im = nnx_lowered[name]
    fq = np.asarray(jax.jit(qm.apply)(params, rest, stats, digits.x_test))
    il = np.asarray(_run(im, digits.x_test))
    assert acc(fq, digits.y_test) > 0.8
    assert _agreement(fq, il) >= 0.999
    print(f"{name}: integer argmax == fake-quant argmax on {_agreement(fq, il):.4f} of {len(fq)}")


def _all_vars(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval"))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _all_vars(sub)


@pytest.mark.slow  # trains an NNX model briefly, then calibrates and lowers it
def test_nnx_model_in_linen_convention_lowers_like_the_job_does(digits):
    """The job's NNX route: ``hqjax.from_nnx`` -> ``quantize_model`` (a QuantizedNNXApply)
    -> calibrate -> ``to_integer``; integers agree with fake-quant."""
    model, v = hqjax.from_nnx(train_nnx(um.NNXCNN(nnx.Rngs(0)), digits))
    qm = quantize_model(model, _mixed(hqjax.blocks(v["params"]).names))
    vq = qm.calibrate(v, digits.x_train[:512])
    im = to_integer(qm, vq, digits.x_train.shape[1:])
    fake = np.asarray(qm.apply(vq, digits.x_test)).argmax(-1)
    assert np.mean(np.asarray(_run(im, digits.x_test)).argmax(-1) == fake) >= 0.999


@pytest.mark.slow  # trains and lowers each user model once (module fixture)
@pytest.mark.parametrize("name", [*sorted(um.LINEN_MODELS), *sorted(um.NNX_MODELS)])
def test_integer_forward_has_no_float_value(name, linen_lowered, nnx_lowered, digits):
    im = {**linen_lowered, **nnx_lowered}[name][2]
    q = im.quantize_input(digits.x_test[:4])
    jaxpr = jax.make_jaxpr(im.forward)(q).jaxpr
    dtypes = {np.dtype(v.aval.dtype) for v in _all_vars(jaxpr)}
    assert dtypes and all(issubclass(d.type, INT) for d in dtypes), dtypes
    assert not im.meta["float_islands"]


@pytest.mark.slow  # trains and lowers each user model once (module fixture)
def test_depthwise_and_pooling_lowered_as_integer_steps(linen_lowered):
    im = linen_lowered["mobile_block"][2]
    ops = [s["op"] for s in im.meta["program"]]
    assert "sum_pool" in ops and ops.count("linear") == 5
    # BatchNorm is folded: no separate BatchNorm step, the int8 kernels are the fake-quant integers
    assert "affine" not in ops
    assert "max_pool" in [s["op"] for s in linen_lowered["vggish"][2].meta["program"]]


@pytest.mark.slow  # two calibrations and two integer programs to compile
def test_twin_linen_and_nnx_give_the_same_integers(digits):
    lin = um.TwinLinen()
    v = um.init_linen(lin, seed=3)
    twin = um.twin_nnx_from_linen(v)
    cfg = _mixed(["conv1", "conv2", "dense"])
    qm = quantize_model(lin, cfg)
    im_l = to_integer(qm, jax.jit(qm.calibrate)(v, digits.x_train[:256]), (8, 8, 1))
    _, params, rest = nnx.split(twin, nnx.Param, ...)
    qn = quantize_nnx_model(twin, cfg)
    im_n = to_integer(qn, (params, rest, jax.jit(qn.calibrate)(params, rest, None, digits.x_train[:256])), (8, 8, 1))
    q = im_l.quantize_input(digits.x_test)
    np.testing.assert_array_equal(np.asarray(im_n.quantize_input(digits.x_test)), np.asarray(q))
    fwd = jax.jit(lambda im, q: im.forward(q))
    np.testing.assert_array_equal(np.asarray(fwd(im_n, q)), np.asarray(fwd(im_l, q)))
    assert im_l.meta["program"] == im_n.meta["program"]


# --------------------------------------------------------------------------- unsupported ops
class _Normed(nn.Module):
    """conv -> relu -> LayerNorm (no integer form) -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv")(x))
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


class _Gate(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="proj")(nn.gelu(x))


class _Gelu(nn.Module):
    """dense -> a submodule applying GELU then a dense -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, name="fc")(x.reshape((x.shape[0], -1)))
        return nn.Dense(10, name="out")(_Gate(name="gate")(x))


class _SoftmaxOut(nn.Module):
    """dense -> relu -> dense -> softmax: a float op after the last layer, at the top level."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16, name="fc")(x.reshape((x.shape[0], -1))))
        return nn.softmax(nn.Dense(10, name="out")(x))


def _lower(model, digits, init_np, **kwargs):
    v = init_np(model, digits.x_train[:2], seed=2)
    qm = quantize_model(model, _mixed(hqjax.blocks(v["params"]).names))
    vq = jax.jit(qm.calibrate)(v, digits.x_train[:256])
    return qm, vq, lambda **kw: to_integer(qm, vq, (8, 8, 1), **kwargs, **kw)


@pytest.mark.parametrize("model, path, kind", [(_Normed(), "norm", "LayerNorm"), (_Gelu(), "gate", "_Gate"),
                                               (_SoftmaxOut(), "<top level>", "_SoftmaxOut")])
def test_unsupported_op_names_op_and_module_path(model, path, kind, digits, init_np):
    _, _, lower = _lower(model, digits, init_np)
    with pytest.raises(ValueError, match=rf"cannot lower op '\w+'.* at module path '{path}' \({kind}\).*"
                                         rf"float_islands=True"):
        lower()


@pytest.mark.parametrize("model, path", [(_Normed(), "norm"), (_Gelu(), "gate"), (_SoftmaxOut(), "")])
def test_float_islands_opt_in_runs_and_lists_islands(model, path, digits, init_np, tmp_path):
    qm, vq, lower = _lower(model, digits, init_np)
    im = lower(float_islands=True)
    islands = im.meta["float_islands"]
    # one island: the op's module, and float layout ops up to the next layer's quantizer
    assert len(islands) == 1 and path in islands[0]["paths"] and set(islands[0]["paths"]) <= {path, ""}
    fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    il = np.asarray(_run(im, digits.x_test))
    assert _agreement(fq, il) >= 0.99
    try:
        import flatbuffers  # noqa: F401
    except ImportError:  # jax.export's optional serializer: saving says so in one line
        with pytest.raises(ValueError, match="pip install flatbuffers"):
            save_integer_model(im, tmp_path / "im")
        assert not (tmp_path / "im").exists()  # nothing half-written
        return
    save_integer_model(im, tmp_path / "im")
    back = load_integer_model(tmp_path / "im")
    assert back.meta["float_islands"] == islands
    np.testing.assert_array_equal(np.asarray(_run(back, digits.x_test[:7])), il[:7])


@pytest.mark.slow  # trains and lowers each user model once (module fixture)
@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_transformer_lowers_with_float_islands_to_the_fake_quant_logits(name, digits, init_np):
    """Flax's own attention (DenseGeneral/LinearGeneral q/k/v with (heads, head_dim) outputs),
    LayerNorm, GELU and residuals; the NNX model iterates an ``nnx.List`` of blocks and reads a
    submodule's attribute. Every projection is integer, attention's softmax and the norms float
    islands; the logits are the fake-quant model's, but for the few examples where an
    activation sat on a rounding boundary and was requantized to the neighbouring integer."""
    if name == "linen":
        model = um.RowViT()
        v = init_linen_at(init_np, model, digits)
        qm = quantize_model(model, _mixed(hqjax.blocks(v["params"]).names))
        vq = jax.jit(qm.calibrate)(v, digits.x_train[:256])
        fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    else:
        model = um.NNXRowViT(nnx.Rngs(0))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        qm = quantize_nnx_model(model, _mixed(hqjax.blocks(params).names))
        vq = (params, rest, jax.jit(qm.calibrate)(params, rest, None, digits.x_train[:256]))
        fq = np.asarray(jax.jit(qm.apply)(*vq, digits.x_test))
    im = to_integer(qm, vq, (8, 8, 1), float_islands=True)
    assert {"block0/attn/query", "blocks/0/attn/query"} & set(im.meta["layers"])
    assert set(im.meta["layers"]) == set(qm.bit_config)  # every projection is an integer layer
    islands = im.meta["float_islands"]
    assert any("LayerNorm" in isl["modules"] for isl in islands)
    assert any("softmax" in " ".join(isl["ops"]) or "exp" in isl["ops"] for isl in islands)
    il = np.asarray(_run(im, digits.x_test))
    same = np.abs(il - fq).max(-1) <= 1e-4 * np.abs(fq).max()
    print(f"{name}: {same.mean():.4f} of examples with the fake-quant logits, argmax agreement {_agreement(fq, il)}")
    assert same.mean() >= 0.97 and _agreement(fq, il) >= 0.99


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_dropout_models_quantize_train_and_lower(kind, digits):
    """Dropout is off in eval and in integer inference (an NNX module's RNG keys are state the
    lowering skips), and the QAT step runs on the model."""
    import optax

    from hqjax.train import init_variables

    if kind == "linen":
        model = um.DropoutMLP()
        v = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    else:
        model, v = hqjax.from_nnx(um.NNXDropoutMLP(nnx.Rngs(0)))
    qm = quantize_model(model, _mixed(["fc", "head"]))
    vq = jax.jit(qm.calibrate)(v, digits.x_train[:256])
    im = to_integer(qm, vq, (8, 8, 1))
    fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    assert _agreement(fq, np.asarray(_run(im, digits.x_test))) >= 0.99
    opt = optax.adam(1e-3)
    step = jax.jit(hqjax.make_qat_step(qm, opt, batchnorm="update"))
    state = hqjax.init_qat_state(vq, opt)
    losses = []
    for _ in range(2):
        state, metrics = step(state, digits.x_train[:64], digits.y_train[:64])
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and int(state.step) == 2


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_token_model_takes_ids_and_looks_up_the_fake_quant_table_in_float(kind):
    """A model of token ids: the ids enter the program as they are, the lookup of the 3-bit
    embedding table is a float island reading the fake-quant table, the rest is integer; the
    logits are the fake-quant model's. Without float islands: one error naming token ids."""
    ids = np.random.default_rng(0).integers(0, 64, size=(200, 12)).astype(np.int32)
    cfg = {"embed": {"weight_bits": 3, "act_bits": None}, "fc": {"weight_bits": 4, "act_bits": 8},
           "head": {"weight_bits": 8, "act_bits": 8}}
    if kind == "linen":
        model = um.TokenNet()
        v = model.init(jax.random.key(0), ids[:1])
        qm = quantize_model(model, cfg)
        vq = jax.jit(qm.calibrate)(v, ids[:128])
        fq = np.asarray(jax.jit(qm.apply)(vq, ids))
    else:
        model = um.NNXTokenNet(nnx.Rngs(0))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        qm = quantize_nnx_model(model, cfg)
        vq = (params, rest, jax.jit(qm.calibrate)(params, rest, None, ids[:128]))
        fq = np.asarray(jax.jit(qm.apply)(*vq, ids))
    with pytest.raises(ValueError, match=r"integer inputs \(token ids.*float_islands=True"):
        to_integer(qm, vq, (12,), input_dtype=jnp.int32)
    im = to_integer(qm, vq, (12,), input_dtype=jnp.int32, float_islands=True)
    assert [isl["paths"] for isl in im.meta["float_islands"]] == [["embed"]] and im.meta["layers"] == ["fc", "head"]
    assert im.quantize_input(ids).dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(_run(im, ids)), fq, atol=1e-5 * np.abs(fq).max())


class _RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(32, name="fc")(x))


class _Rematted(nn.Module):
    """Blocks under ``nn.remat`` (gradient checkpointing): their layers sit inside a
    ``checkpoint`` call of the traced program."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        for i in range(2):
            x = nn.remat(_RematBlock)(name=f"block{i}")(x)
        return nn.Dense(10, name="head")(x)


def test_rematerialized_blocks_are_lowered_as_integer_layers(digits, init_np):
    qm, vq, lower = _lower(_Rematted(), digits, init_np)
    im = lower()
    assert im.meta["layers"] == ["block0/fc", "block1/fc", "head"] and not im.meta["float_islands"]
    fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    assert _agreement(fq, np.asarray(_run(im, digits.x_test))) >= 0.99


class _InputNorm(nn.Module):
    """LayerNorm on the raw input, then conv -> relu -> dense: no layer quantizes the input."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.LayerNorm(name="norm")(x)
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


def test_input_meeting_a_float_op_first_enters_as_a_float_island(digits, init_np):
    qm, vq, lower = _lower(_InputNorm(), digits, init_np)
    with pytest.raises(ValueError, match="reaches no Dense/Conv layer.*Pass float_islands=True"):
        lower()
    im = lower(float_islands=True)
    assert im.meta["float_islands"][0]["paths"][0] == "norm" and im.quantize_input(digits.x_test).dtype == jnp.float32
    fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
    assert _agreement(fq, np.asarray(_run(im, digits.x_test))) >= 0.99


def init_linen_at(init_np, model, digits):
    return init_np(model, digits.x_train[:2], seed=3)


def test_integer_program_is_batch_agnostic_and_serializes(linen_lowered, digits, tmp_path):
    _, _, im = linen_lowered["projection_resnet"]
    save_integer_model(im, tmp_path / "im")
    back = load_integer_model(tmp_path / "im")
    assert back.meta_json == im.meta_json  # same static program: one compile serves both
    fwd = jax.jit(lambda m, q: m.forward(q))
    for n in (1, 5):
        q = im.quantize_input(digits.x_test[:n])
        np.testing.assert_array_equal(np.asarray(fwd(back, q)), np.asarray(fwd(im, q)))


# --------------------------------------------------------------------------- geometry
class _Zoo(nn.Module):
    """Dilated, grouped and VALID convolutions, two branches concatenated, SAME average
    pooling, channel padding, a transpose and a DenseGeneral over two axes."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", kernel_dilation=2, name="dilated")(x))
        a = nn.relu6(nn.Conv(8, (3, 3), padding="VALID", feature_group_count=2, name="grouped")(x))
        b = nn.relu(nn.Conv(4, (1, 1), strides=(1, 1), name="point")(x))[:, 1:-1, 1:-1, :]
        x = jnp.concatenate([a, b], axis=-1)
        x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (2, 2)))
        x = jnp.transpose(x, (0, 2, 1, 3))
        x = nn.DenseGeneral(6, axis=(-2, -1), name="mix")(x)
        return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


class _NNXBn(nnx.Module):
    """conv -> BatchNorm -> relu -> global average pool -> linear, in NNX."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


def _close(fq, il):
    fq, il = np.asarray(fq), np.asarray(il)
    return float(np.mean(np.abs(fq - il) <= np.abs(fq).max() / 127))


def test_convolution_geometry_concat_and_pooling(digits, init_np):
    qm, vq, lower = _lower(_Zoo(), digits, init_np)
    im = lower()
    ops = {s["op"] for s in im.meta["program"]}
    assert {"concat", "sum_pool", "pad", "transpose", "slice", "linear"} <= ops
    assert _close(jax.jit(qm.apply)(vq, digits.x_test), _run(im, digits.x_test)) >= 0.99


def test_nnx_batchnorm_is_folded_in_eval_mode_only(digits):
    model = _NNXBn(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    model.bn.mean.value = jnp.asarray(rng.normal(0, 0.2, 8), jnp.float32)
    model.bn.var.value = jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32)
    model.bn.scale.value = jnp.asarray(rng.uniform(0.5, 1.5, 8) * rng.choice([-1, 1], 8), jnp.float32)
    cfg = _mixed(["conv", "head"])
    model.train()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    qm = quantize_nnx_model(model, cfg)
    stats = qm.calibrate(params, rest, None, digits.x_train[:128])
    with pytest.raises(ValueError, match=r"BatchNorm 'bn' is in training mode.*\.eval\(\)"):
        to_integer(qm, (params, rest, stats), (8, 8, 1))
    model.eval()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    qm = quantize_nnx_model(model, cfg)
    stats = jax.jit(qm.calibrate)(params, rest, None, digits.x_train[:512])
    im = to_integer(qm, (params, rest, stats), (8, 8, 1))
    assert [s["op"] for s in im.meta["program"]].count("affine") == 0  # folded into the conv
    assert _close(jax.jit(qm.apply)(params, rest, stats, digits.x_test), _run(im, digits.x_test)) >= 0.99


class _ReorderedEinsum(nn.Module):
    """An einsum whose product puts the kernel's output axis first ('bi,io->ob')."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16, name="fc")(x.reshape((x.shape[0], -1))))
        return nn.Einsum((16, 10), "bi,io->ob", use_bias=False, name="mix")(x).T


def test_einsum_layers_lower_as_dense_layers_in_linen_and_nnx(digits, init_np):
    """``nn.Einsum`` / ``nnx.Einsum`` ('btd,dnh->btnh'): integer layers like DenseGeneral;
    integers agree with fake-quant (trained, so the argmax means something); an einsum that
    reorders the product's axes is refused by name."""
    linen = um.EinsumNet()
    v = train_linen(linen, init_np(linen, digits.x_train[:2], seed=2), digits)
    nnx_model, nv = hqjax.from_nnx(train_nnx(um.NNXEinsumNet(nnx.Rngs(0)), digits))
    for model, variables in ((linen, v), (nnx_model, nv)):
        qm = quantize_model(model, _mixed(hqjax.blocks(variables["params"]).names))
        vq = jax.jit(qm.calibrate)(variables, digits.x_train[:512])
        im = to_integer(qm, vq, (8, 8, 1))
        assert im.meta["layers"] == ["heads", "head"] and not im.meta["float_islands"]
        fq = np.asarray(jax.jit(qm.apply)(vq, digits.x_test))
        assert np.mean(fq.argmax(-1) == digits.y_test) > 0.8
        assert _agreement(fq, _run(im, digits.x_test)) >= 0.99
    _, _, lower = _lower(_ReorderedEinsum(), digits, init_np)
    with pytest.raises(ValueError, match=r"layer 'mix': integer Dense layers contract the trailing input axes"):
        lower()
