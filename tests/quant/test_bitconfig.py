"""BitConfig validation and JSON round trip (hqjax/quant/bitconfig.py)."""

import pytest

from hqjax.quant.bitconfig import load_bit_config, save_bit_config, uniform_bit_config, validate_bit_config


def test_uniform_and_json_roundtrip(tmp_path):
    cfg = uniform_bit_config(["conv1", "stage2/block0/conv1"], 4, None)
    cfg["conv1"]["act_bits"] = 8
    path = tmp_path / "bits.json"
    save_bit_config(cfg, path)
    assert load_bit_config(path, names=["conv1", "stage2/block0/conv1", "fc"]) == cfg
    assert '"weight_bits": 4' in path.read_text()


@pytest.mark.parametrize("entry,match", [
    ({"weight_bits": 0, "act_bits": 8}, "weight_bits=0"),
    ({"weight_bits": 9, "act_bits": 8}, "weight_bits=9"),
    ({"weight_bits": 4, "act_bits": 1}, "act_bits=1"),
    ({"weight_bits": 4.0, "act_bits": 8}, "weight_bits=4.0"),
    ({"act_bits": 8}, "needs a 'weight_bits' key"),
    ({"weight_bits": 4, "wbits": 8}, "unknown keys"),
])
def test_bad_entries_name_the_layer(entry, match):
    with pytest.raises(ValueError, match=match) as err:
        validate_bit_config({"stage1/block0/conv2": entry})
    assert "stage1/block0/conv2" in str(err.value)


def test_unknown_layer_lists_valid_paths():
    with pytest.raises(ValueError, match=r"do not exist: \['conv9'\].*\['conv1', 'dense'\]"):
        validate_bit_config({"conv9": {"weight_bits": 4, "act_bits": 8}}, names=["conv1", "dense"])
