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
