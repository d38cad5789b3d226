"""The README's "Your own model" section runs as written (its Python blocks, in order)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


@pytest.mark.slow
def test_your_own_model_section_runs(tmp_path, monkeypatch):
    """The Linen example and its NNX twin: both allocate, the twin's allocation equals the
    Linen one (asserted in the README itself), and the fake-quant models run; the scanned
    model's allocation gives each layer of its stack a width of its own."""
    blocks = _section_blocks("Your own model")
    assert len(blocks) == 3  # the Linen example, its NNX twin, a scanned model
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["nnx_bits"] == namespace["bit_config"]
    assert set(namespace["bit_config"]) == {"conv1", "conv2", "head"}
    assert (tmp_path / "runs" / "nnx" / "bit_config.json").exists()
    layers = {f"blocks/{fc}[{i}]" for i in range(4) for fc in ("fc1", "fc2")}
    assert namespace["stacked"] == ("blocks",) and set(namespace["scan_bits"]) == layers | {"embed", "head"}
    assert len({namespace["scan_bits"][n]["weight_bits"] for n in layers}) > 1


@pytest.mark.slow
def test_curvature_section_runs(tmp_path, monkeypatch):
    """The curvature example: its per-layer Hessian traces are exact on the ReLU CNN (the
    Gauss-Newton split needs no probe beyond the minimum) and the other estimators run."""
    blocks = _section_blocks("Curvature")
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    layers = namespace["layers"]
    assert layers.curvature == "hessian" and layers.block_names == ("conv1", "conv2", "dense")
    assert all(abs(se) <= 1e-6 * abs(t) for t, se in layers.per_block().values())
    assert (tmp_path / "trace.json").exists()
