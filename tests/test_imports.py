"""What ``import hqjax`` loads: no JAX internals and no CPU backend in the core, and none of the
heavy optional stacks until their feature is used.

The accelerator image has JAX, Flax, Optax, Chex and PyTorch but no network: OR-Tools
(allocation), tensorflow-datasets (tfds data) and scikit-learn (the digits data) must not be
needed to import the library or to run ``benchmarks/device_check.py``'s kernel and
curvature sections.
"""

import json
import os
import subprocess
import sys
import textwrap

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
            "from hqjax.alloc._backends import solve_choice_program\nimport numpy as np\n"
            "solve_choice_program(np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones((2, 2), bool),\n"
            "                     [np.array([[2.0, 1.0], [1.0, 2.0]])], [3.0], reduce=False)\n"
            "print('sklearn' in sys.modules, 'ortools' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["True", "True"]


def test_core_loads_no_jax_internals_from_hqjax_and_no_cpu_backend():
    """``import hqjax`` and every module of curvature, quant and alloc, in a fresh process."""
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import hqjax
        for pkg in ("hqjax.curvature", "hqjax.quant", "hqjax.alloc"):  # the core, every module of it
            for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
                if info.name != "__main__":
                    importlib.import_module(f"{pkg}.{info.name}")
        mods = sorted(m for m in sys.modules if m == "hqjax" or m.startswith("hqjax."))
        backend = [m for m in mods if m.startswith("hqjax.kernels.cpu")]
        internal = []
        for m in mods:
            path = getattr(sys.modules[m], "__file__", None)
            if path and "jax." + "_src" in open(path).read():
                internal.append(m)
        print(len(mods), backend, internal)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, backend, internal = out.stdout.strip().split(" ", 2)
    assert int(count) > 10  # the check saw hqjax's modules
    assert (backend, internal) == ("[]", "[]"), out.stdout
