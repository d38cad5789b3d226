import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.curvature._loop import make_while, map_chunks, resolve_loop


def test_auto_picks_host_on_cpu_outside_jit_and_device_under_jit():
    x = jnp.ones(3)
    assert resolve_loop("auto", x) == ("host" if jax.default_backend() == "cpu" else "device")
    seen = []
    jax.jit(lambda y: seen.append((resolve_loop("auto", y), resolve_loop("host", y))) or y)(x)
    assert seen == [("device", "device")]
    with pytest.raises(ValueError, match="loop must be one of"):
        resolve_loop("cpu", x)


def test_host_and_device_loops_agree_and_closed_over_arrays_are_arguments():
    w = jnp.arange(4.0)
    body = lambda s: (s[0] + 1, s[1] * 0.5 + w)
    cond = lambda s: s[0] < 5
    init = (jnp.int32(0), jnp.zeros(4))
    host, dev = make_while(cond, body, init, "host")(init), make_while(cond, body, init, "device")(init)
    np.testing.assert_allclose(host[1], dev[1])
    assert int(host[0]) == 5
    xs = jnp.arange(10.0)[:, None] * jnp.ones((1, 3))
    f = lambda r: r * w[:3]
    np.testing.assert_allclose(map_chunks(f, xs, 4, "host"), map_chunks(f, xs, 4, "device"))
