"""hqjax.kernels.cpu.reuse_host_memory: XLA:CPU's scratch memory stops being faulted in on every call."""

import subprocess
import sys
import textwrap
import warnings

import pytest

import hqjax.kernels.cpu

# A jitted function whose scratch buffer (cumsum's 80 MB intermediate) is larger than the
# 64 MiB a non-main malloc arena can hold; prints the fewest minor page faults of one call
# (the heap takes a few calls to settle where its blocks go).
_SCRIPT = textwrap.dedent("""
    import resource, sys
    import hqjax.kernels.cpu
    if sys.argv[1] == "reuse":
        status = hqjax.kernels.cpu.reuse_host_memory()
        assert status.applied, status
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: (jnp.cumsum(x) * x).sum())
    x = jnp.ones(20_000_000)
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(temp, min(faults))
""")


def _faults_per_call(mode):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    temp, faults = out.stdout.split()
    return int(temp), float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's allocator")
def test_reused_host_memory_is_not_faulted_in_again():
    temp, fresh = _faults_per_call("fresh")
    assert temp > 64 * 2**20  # the case the setting exists for
    _, reused = _faults_per_call("reuse")
    # 80 MB faulted in afresh is ~20,000 4 KiB pages on every call; kept in the heap, none once settled
    assert fresh > 5_000, fresh
    assert reused < 500, reused


def test_reuse_host_memory_after_jax_started_says_how_to_fix_it():
    import jax.numpy as jnp

    jnp.ones(3).block_until_ready()  # the backend is running in this (pytest) process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = hqjax.kernels.cpu.reuse_host_memory()
    if not sys.platform.startswith("linux"):
        assert not status.applied and "not Linux" in status.reason
        return
    assert not status.applied
    assert "before the first JAX computation" in status.reason and "MALLOC_ARENA_MAX=1" in status.reason
    assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    assert status.environment["MALLOC_ARENA_MAX"] == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command-line entry point asks quietly
        assert hqjax.kernels.cpu.reuse_host_memory(warn=False) == status


def test_reuse_host_memory_rejects_a_block_size_mallopt_cannot_take():
    with pytest.raises(ValueError, match="max_block_bytes"):
        hqjax.kernels.cpu.reuse_host_memory(max_block_bytes=2**31)
