"""hqjax.kernels.cpu.gram_schmidt: the native modified Gram-Schmidt equals XLA's, and Lanczos
with it as ``orthogonalize`` gives the default's tridiagonal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.curvature.lanczos import lanczos_runner
from hqjax.kernels.cpu import gram_schmidt

@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("rows,n,count", [(1, 5, 1), (6, 4096 * 3 + 5, 4), (6, 70_001, 6), (3, 9, 0), (3, 9, 7),
                                          (2, 4096 * 64 + 1, 2)])
def test_native_gram_schmidt_equals_modified_gram_schmidt(rows, n, count):
    r = np.random.default_rng(rows * n)
    w = jnp.asarray(r.standard_normal(n), jnp.float32)
    basis = jnp.asarray(r.standard_normal((rows, n)), jnp.float32)
    basis = basis / jnp.linalg.norm(basis, axis=1, keepdims=True)
    got = jax.jit(gram_schmidt.gram_schmidt)(w, basis, count)
    want = np.asarray(w, np.float64)
    for v in np.asarray(basis, np.float64)[:min(count, rows)]:  # float64 modified Gram-Schmidt
        want = want - (v @ want) * v
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(np.asarray(w)).max())
    np.testing.assert_allclose(got, jax.jit(gram_schmidt.reference_gram_schmidt)(w, basis, count), rtol=1e-4,
                               atol=1e-5 * np.abs(np.asarray(w)).max())
    # a fixed partition of n: the same bits every call, whatever the thread scheduling
    np.testing.assert_array_equal(got, jax.jit(gram_schmidt.gram_schmidt)(w, basis, count))


@pytest.mark.usefixtures("native")
def test_portable_gram_schmidt_equals_reference(scalar_isa):
    r = np.random.default_rng(1)
    w = jnp.asarray(r.standard_normal(4096 * 3 + 5), jnp.float32)
    basis = jnp.asarray(r.standard_normal((4, w.size)), jnp.float32)
    basis = basis / jnp.linalg.norm(basis, axis=1, keepdims=True)
    # the kernel reads the ISA at each call, so the portable sweep runs here
    np.testing.assert_allclose(gram_schmidt.gram_schmidt(w, basis, 3), gram_schmidt.reference_gram_schmidt(w, basis, 3),
                               rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("num_steps", [1, 5, 17])
def test_lanczos_with_native_orthogonalization_equals_the_default(num_steps):
    r = np.random.default_rng(num_steps)
    A = r.standard_normal((40, 40))
    M = jnp.asarray(A + A.T, jnp.float32)
    v0 = jnp.asarray(r.standard_normal(40), jnp.float32)
    run = lambda orth: lanczos_runner(lambda x: M @ x, num_steps, v0, "device", jax.random.key(5),
                                      orthogonalize=orth)(v0)
    a0, b0, _, j0 = run(None)
    a1, b1, _, j1 = run(gram_schmidt.orthogonalize)
    assert int(j0) == int(j1) == num_steps
    scale = float(jnp.abs(M).max())
    np.testing.assert_allclose(a1, a0, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(b1, b0, rtol=1e-4, atol=1e-4 * scale)
    jaxpr = str(jax.make_jaxpr(lambda v: lanczos_runner(lambda x: M @ x, num_steps, v0, "device", jax.random.key(5),
                                                        orthogonalize=gram_schmidt.orthogonalize)(v))(v0))
    assert "hqjax_gram_schmidt_f32" in jaxpr
