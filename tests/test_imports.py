"""The core is plain JAX: ``import hqjax`` and its core modules load no JAX internals and no CPU backend."""

import subprocess
import sys
import textwrap


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
