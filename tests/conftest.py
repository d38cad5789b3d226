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
