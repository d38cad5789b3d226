"""Test-wide settings: eight host CPU devices so multi-device code is tested on one machine.

XLA reads XLA_FLAGS once, when jax is first imported, so this runs before any test module.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

# Test-only helper modules (user_models.py: models hqjax does not ship) import by bare name.
import sys as _sys

_sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402  (after the environment above, which jax must see first)
import pytest  # noqa: E402


def _assert_close(got, want, rtol=1e-5):
    """Every leaf of the pytree ``got`` equals ``want``'s up to ``rtol``, relative to the
    largest entry of that leaf of ``want`` (so tiny entries are judged at the leaf's scale)."""
    import jax

    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), (len(got_leaves), len(want_leaves))
    for g, w in zip(got_leaves, want_leaves):
        w = np.asarray(w)
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="session")
def assert_close():
    """The suite's one closeness check: ``assert_close(got, want, rtol=1e-5)`` over pytrees."""
    return _assert_close
