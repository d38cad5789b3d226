"""benchmarks/hawq_task.py, in its quick mode without PyTorch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quick_run_gives_equal_exact_traces_however_the_per_example_pass_is_batched(tmp_path):
    """ResNet-20 and the user's NNX MobileNet (ReLU6, depthwise convolutions): both are
    piecewise linear in each layer's weights, so the Gauss-Newton split is the exact Hessian
    trace and equals the Gauss-Newton traces, batched either way."""
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hawq_task.py"), "--quick", "--no-torch",
                        "--models", "resnet20,mobilenet", "--methods", "split,ggn,ggn-batched", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) == {"resnet20", "mobilenet"}
    for model, r in res.items():
        h = r["hqjax"]
        split, ggn, batched = (np.asarray(h[m]["traces"], np.float64) for m in ("split", "ggn", "ggn-batched"))
        assert len(ggn) == (20 if model == "resnet20" else 15)
        np.testing.assert_allclose(batched, ggn, rtol=1e-4, err_msg=model)
        np.testing.assert_allclose(split, ggn, rtol=1e-4, err_msg=model)
        assert np.all(ggn > 0) and max(h["split"]["stderr"]) == 0
    assert "headline: no PyHessian run" in p.stdout
