"""BitConfig -> Qwix rules (hqjax/quant/qwix_export.py)."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.quant.qwix_export import qwix_rule_specs, to_qwix_rules

CFG = {
    "conv1": {"weight_bits": 8, "act_bits": 8},
    "conv10": {"weight_bits": 4, "act_bits": None},
    "stage1/block0/conv1": {"weight_bits": 2, "act_bits": 8},
    "encoder/layer0/attention/query": {"weight_bits": 3, "act_bits": 6},
}


def _first_match(specs, path):
    """Qwix's lookup: the first rule whose module_path regex fullmatches the path."""
    return next((s for s in specs if re.fullmatch(s["module_path"], path)), None)


def test_every_layer_gets_its_own_rule_and_nothing_else_matches():
    specs, rounded = qwix_rule_specs(CFG)
    for layer, entry in CFG.items():
        rule = _first_match(specs, layer)
        assert rule is not None and re.fullmatch(rule["module_path"], layer)
        assert rule["weight_qtype"] == f"int{max(entry['weight_bits'], 2) if entry['weight_bits'] in (2, 4, 8) else 4}"
    for other in ("conv100", "conv", "stage1/block0/conv1x", "stage1/block0", "dense", "encoder/layer0/attention"):
        assert _first_match(specs, other) is None
    assert _first_match(specs, "conv10")["act_qtype"] is None
    assert ("encoder/layer0/attention/query", "weight_bits", 3, 4) in rounded
    assert ("encoder/layer0/attention/query", "act_bits", 6, 8) in rounded


def test_strict_refuses_widths_qwix_lacks():
    with pytest.raises(ValueError, match="'encoder/layer0/attention/query': weight_bits=3 has no Qwix integer type"):
        qwix_rule_specs(CFG, strict=True)


@pytest.mark.skipif(importlib.util.find_spec("qwix") is not None, reason="Qwix is installed")
def test_missing_qwix_raises_clear_import_error():
    with pytest.raises(ImportError, match="pip install qwix"):
        to_qwix_rules(CFG)


@pytest.mark.skipif(importlib.util.find_spec("qwix") is None, reason="Qwix is not installed")
def test_rules_drive_qwix_on_the_cnn(init_np):
    import qwix

    from hqjax.models import CNN

    model = CNN()
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)), jnp.float32)
    v = jax.tree.map(jnp.asarray, init_np(model, x))  # Qwix finds params by identity: jax arrays
    cfg = {"conv1": {"weight_bits": 8, "act_bits": 8}, "conv2": {"weight_bits": 8, "act_bits": 8},
           "dense": {"weight_bits": 4, "act_bits": None}}
    qmodel = qwix.quantize_model(model, qwix.QtProvider(to_qwix_rules(cfg)))
    y, stats = qmodel.apply(v, x, mutable=["quant_stats"])
    assert set(stats["quant_stats"]) == {"conv1", "conv2"}  # activation rules matched the conv layers
    assert not np.allclose(np.asarray(y), np.asarray(model.apply(v, x)))


def test_export_adapts_convolutions_per_provider_and_says_so(caplog):
    from hqjax.quant.qwix_export import export_qwix

    cfg = {"conv": {"weight_bits": 3, "act_bits": 8}, "fc": {"weight_bits": 4, "act_bits": 8},
           "same": {"weight_bits": 8, "act_bits": 8}, "grouped": {"weight_bits": 4, "act_bits": 8}}
    kinds = {"conv": "conv", "fc": "dense", "same": "conv", "grouped": "dense_general"}
    with caplog.at_level("WARNING", logger="hqjax"):
        ptq = export_qwix(cfg, kinds, provider="ptq", grouped_layers=["grouped"])
    qt = export_qwix(cfg, kinds, provider="qt")
    rule = lambda ex, layer: next(s for s in ex.specs if s["module_path"] == re.escape(layer))
    assert (rule(ptq, "conv")["weight_qtype"], rule(ptq, "conv")["act_qtype"]) == ("int8", "int8")
    assert (rule(qt, "conv")["weight_qtype"], rule(qt, "conv")["act_qtype"]) == ("int4", None)
    for ex in (ptq, qt):  # dense layers keep mixed types; equal-typed convolutions are untouched
        assert (rule(ex, "fc")["weight_qtype"], rule(ex, "fc")["act_qtype"]) == ("int4", "int8")
        assert (rule(ex, "same")["weight_qtype"], rule(ex, "same")["act_qtype"]) == ("int8", "int8")
    assert {(c.layer, c.action) for c in ptq.changes} == {("conv", "round_up"), ("conv", "widen"),
                                                          ("grouped", "per_channel")}
    assert {(c.layer, c.action) for c in qt.changes} == {("conv", "round_up"), ("conv", "weight_only")}
    assert all(c.exported == ("int8", "int8") for c in ptq.changes if c.layer == "conv")
    assert "conv: W3A8 -> ('int8', 'int8') (widen)" in caplog.text
    with pytest.raises(ValueError, match=r"no layer kind for \['fc', 'same', 'grouped'\]"):
        export_qwix(cfg, {"conv": "conv"})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("qwix") is None, reason="Qwix is not installed")
def test_qwix_serves_a_mixed_allocation_close_to_hqjax_fake_quant(digits):
    """A HAWQ allocation (3-bit conv, 8-bit activations: the case Qwix's providers refused)
    exported, served through qwix.quantize_model under both providers (Linen, and the NNX
    twin with equal outputs), and compared with hqjax's calibrated fake-quant model on the
    digits test set."""
    import hqjax
    import user_models as um
    from hqjax.quant.qwix_export import export_qwix, qwix_apply
    from hqjax.train import TrainConfig, accuracy, cross_entropy, train

    model = um.TwinLinen()
    v = train(model, digits.x_train, digits.y_train, TrainConfig(epochs=8, batch_size=64))
    x = jnp.asarray(digits.x_train[:256])
    loss = lambda p: cross_entropy(model.apply({"params": p}, x), jnp.asarray(digits.y_train[:256]))
    tr = hqjax.trace(lambda u: hqjax.hvp(loss, v["params"], u), v["params"], jax.random.key(0), num_probes=8)
    table = hqjax.sensitivity_table(v["params"], [2, 3, 4, 8], traces=tr)
    shapes = hqjax.layer_shapes(model, v, x[:1], train=False)
    costs = hqjax.LayerCosts.from_shapes(shapes)
    budget = {"size": 0.5 * sum(costs.size_bytes(n, 8) for n in costs.names)}
    alloc = hqjax.allocate(table, costs, budget, candidates=(2, 3, 4, 8), act_candidates=(8,),
                           fixed={"conv2": (3, 8)})
    cfg = alloc.bit_config
    assert len({e["weight_bits"] for e in cfg.values()}) > 1, cfg
    qm = hqjax.quantize_model(model, cfg)
    vq = jax.jit(qm.calibrate)(v, x)
    acc_fp = accuracy(model.apply, v, digits.x_test, digits.y_test)
    acc_hqjax = accuracy(qm.apply, vq, digits.x_test, digits.y_test)
    gaps = {}
    for provider in ("ptq", "qt"):
        ex = export_qwix(cfg, shapes, provider=provider)
        assert any(c.layer == "conv2" for c in ex.changes)
        served = qwix_apply(model, v, ex, x[:1], train=False)
        logits = np.asarray(served(digits.x_test))
        acc = float(np.mean(logits.argmax(-1) == digits.y_test))
        gaps[provider] = acc - acc_hqjax
        # the NNX twin with the same weights, served through Qwix's NNX path, gives the same logits
        twin = qwix_apply(um.twin_nnx_from_linen(v), None, ex, x[:1])
        np.testing.assert_allclose(np.asarray(twin(digits.x_test)), logits, rtol=1e-5, atol=1e-5)
        # and so does the twin in Linen's convention (hqjax.from_nnx), as the job holds it
        applied = qwix_apply(hqjax.from_nnx(um.twin_nnx_from_linen(v))[0], v, ex, x[:1])
        np.testing.assert_allclose(np.asarray(applied(digits.x_test)), logits, rtol=1e-5, atol=1e-5)
    print(f"bits {cfg}; accuracy: float {acc_fp:.4f}, hqjax fake-quant {acc_hqjax:.4f}, "
          f"Qwix gap ptq {gaps['ptq']:+.4f}, qt {gaps['qt']:+.4f}")
    assert acc_hqjax > 0.85
    assert all(abs(g) <= 0.03 for g in gaps.values()), gaps


def test_layers_of_a_stack_share_one_rule_at_the_widest_width():
    cfg = {"blocks/fc1[0]": {"weight_bits": 2, "act_bits": None}, "blocks/fc1[1]": {"weight_bits": 4, "act_bits": None},
           "head": {"weight_bits": 8, "act_bits": 8}}
    specs, rounded = qwix_rule_specs(cfg)
    assert [s["module_path"] for s in specs] == [re.escape("blocks/fc1"), "head"]
    assert specs[0]["weight_qtype"] == "int4" and rounded == [("blocks/fc1[0]", "weight_bits", 2, 4)]
    from hqjax.quant.qwix_export import export_qwix
    ex = export_qwix(cfg, {"blocks/fc1[0]": "dense", "blocks/fc1[1]": "dense", "head": "dense"})
    assert [(c.layer, c.action, c.exported) for c in ex.changes] == [("blocks/fc1[0]", "stack", ("int4", None))]


@pytest.mark.skipif(importlib.util.find_spec("qwix") is None, reason="needs qwix")
def test_qwix_serves_stacked_layers_in_linen_and_nnx():
    """Qwix derives a scanned weight's quantization from the slice a layer sees; the PTQ
    params are made layer by layer, so PTQ serves the stack and equals QT's fake quant."""
    import hqjax
    import user_models as um
    from flax import nnx
    from hqjax.quant.qwix_export import export_qwix, qwix_apply

    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 1)), jnp.float32)
    model = um.ScanMLP()
    v = model.init(jax.random.key(0), x[:2])
    shapes = hqjax.layer_shapes(model, v, x[:2])
    cfg = {n: {"weight_bits": 4, "act_bits": None} for n in shapes if n.startswith("blocks/")}
    float_out = np.asarray(model.apply(v, x))
    for served_model, variables in ((model, v), (um.NNXScanMLP(nnx.Rngs(0)), None)):
        kw = {"train": False} if variables is not None else {}
        ref = float_out if variables is not None else np.asarray(served_model(x))
        out = {p: np.asarray(qwix_apply(served_model, variables, export_qwix(cfg, shapes, provider=p), x[:2], **kw)(x))
               for p in ("ptq", "qt")}
        np.testing.assert_allclose(out["ptq"], out["qt"], rtol=1e-5, atol=1e-5)
        err = np.abs(out["ptq"] - ref).max()
        assert 1e-3 * np.abs(ref).max() < err < 0.2 * np.abs(ref).max(), err  # the stack is 4-bit, not float
