"""Importing hqjax pulls in none of the heavy optional stacks until their feature is used.

The accelerator image has JAX, Flax, Optax, Chex and PyTorch but no network: OR-Tools
(allocation), tensorflow-datasets (tfds data) and scikit-learn (the digits data) must not be
needed to import the library or to run ``benchmarks/device_check.py``'s kernel and
curvature sections.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("ortools", "tensorflow_datasets", "sklearn")


def test_library_and_device_check_imports_leave_heavy_packages_out():
    code = (
        "import json, sys\n"
        "import hqjax, hqjax.kernels, hqjax.curvature, hqjax.quant\n"
        f"lib = [m for m in {HEAVY!r} if m in sys.modules]\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})\n"
        "import device_check, _device_sections, int_matmul, curvature_vs_pyhessian\n"
        "import hqjax.kernels.tiles, hqjax.kernels.requant\n"
        f"bench = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps([lib, bench]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lib, bench = json.loads(p.stdout.strip().splitlines()[-1])
    assert lib == [] and bench == []


@pytest.mark.slow  # loads scikit-learn and OR-Tools in a fresh interpreter
def test_the_heavy_packages_load_when_their_feature_is_used():
    # the check above is only meaningful if these imports do pull the packages in
    code = ("import sys\nfrom hqjax.data import load_digits\nload_digits()\n"
            "from hqjax.alloc.backends import solve_choice_program\nimport numpy as np\n"
            "solve_choice_program(np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones((2, 2), bool),\n"
            "                     [np.array([[2.0, 1.0], [1.0, 2.0]])], [3.0], reduce=False)\n"
            "print('sklearn' in sys.modules, 'ortools' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["True", "True"]
