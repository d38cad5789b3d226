import json

import jax
import numpy as np
import pytest

import hqjax


def _run_moments(res, p):
    return np.sum(np.asarray(res.weights, np.float64) * np.asarray(res.nodes, np.float64) ** p, axis=-1)


def test_slq_moments_reproduce_trace_and_second_moment_of_the_cnn_hessian(cnn):
    n = cnn.H.shape[0]
    res = hqjax.spectral_density(cnn.matvec, cnn.params, jax.random.key(0), num_steps=20, num_runs=8)
    assert res.nodes.shape == (8, 20) and res.weights.shape == (8, 20)
    np.testing.assert_allclose(np.sum(res.weights, -1), 1.0, rtol=1e-5)
    for p, exact in ((1, np.trace(cnn.H) / n), (2, np.sum(cnn.evals**2) / n)):
        per_run = _run_moments(res, p)  # each run: v^T H^p v / n for its unit probe (Gauss quadrature)
        stderr = per_run.std(ddof=1) / np.sqrt(len(per_run))
        assert abs(per_run.mean() - exact) <= 4 * stderr, (p, per_run.mean(), exact, stderr)
    np.testing.assert_allclose(float(res.moment(1)), _run_moments(res, 1).mean(), rtol=1e-5)
    # Lanczos resolves the extreme eigenvalues first.
    np.testing.assert_allclose(np.max(res.nodes), cnn.evals.max(), rtol=1e-3)
    assert np.min(res.nodes) >= cnn.evals.min() - 1e-4 * abs(cnn.evals).max()


def test_full_krylov_space_recovers_the_whole_spectrum(ex):
    M = ex.symmetric(32, seed=2)
    res = hqjax.spectral_density(ex.operator(M), ex.PARAMS, jax.random.key(1), num_steps=32, num_runs=1)
    np.testing.assert_allclose(np.sort(np.asarray(res.nodes[0])), np.linalg.eigvalsh(M), atol=1e-4)


def test_breakdown_beyond_the_rank_keeps_quadrature_exact(ex):
    M = ex.symmetric(32, seed=3, rank=4)
    res = hqjax.spectral_density(ex.operator(M), ex.PARAMS, jax.random.key(2), num_steps=32, num_runs=2)
    assert np.all(np.isfinite(res.nodes))
    np.testing.assert_allclose(np.sum(res.weights, -1), 1.0, rtol=1e-5)
    # Weight sits on the 4 nonzero eigenvalues and on 0; no spurious node carries weight.
    ev = np.linalg.eigvalsh(M)
    heavy = np.asarray(res.nodes)[np.asarray(res.weights) > 1e-6]
    assert np.all(np.min(np.abs(heavy[:, None] - np.append(ev[-4:], 0.0)[None]), axis=1) < 1e-3 * ev.max())


def test_density_on_grid_is_a_smoothed_probability_density(ex):
    res = hqjax.spectral_density(ex.operator(ex.symmetric(32, seed=4)), ex.PARAMS, jax.random.key(3), num_steps=10, num_runs=2)
    grid, dens = hqjax.density_on_grid(res)
    assert grid.shape == dens.shape == (10_000,)
    np.testing.assert_allclose(float(np.trapezoid(dens, grid)), 1.0, rtol=1e-2)
    assert np.all(np.asarray(dens) >= 0)
    g2, d2 = hqjax.density_on_grid(res, grid=np.linspace(-10, 10, 201), sigma=0.5)
    np.testing.assert_allclose(float(np.trapezoid(d2, g2)), 1.0, rtol=1e-3)
    # the mixture of the runs' quadratures, each node a Gaussian of width sigma
    nodes, weights = np.asarray(res.nodes, np.float64), np.asarray(res.weights, np.float64)
    g = np.asarray(g2, np.float64)[:, None, None]
    want = np.mean(np.sum(weights * np.exp(-(g - nodes) ** 2 / (2 * 0.5**2)) / (0.5 * np.sqrt(2 * np.pi)), -1), -1)
    np.testing.assert_allclose(d2, want, rtol=1e-4, atol=1e-7)


def test_same_key_same_density_and_json_round_trip(ex):
    mv = ex.operator(ex.symmetric(32, seed=5))
    a = hqjax.spectral_density(mv, ex.PARAMS, jax.random.key(9), num_steps=6, num_runs=2, loop="host")
    b = hqjax.spectral_density(mv, ex.PARAMS, jax.random.key(9), num_steps=6, num_runs=2, loop="device")
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=1e-5, atol=1e-6)
    back = hqjax.result_from_dict(json.loads(a.to_json()))
    np.testing.assert_allclose(back.weights, a.weights, rtol=1e-6)
    with pytest.raises(ValueError, match="num_steps and num_runs must be >= 1"):
        hqjax.spectral_density(mv, ex.PARAMS, jax.random.key(9), num_runs=0)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 17, 32])
def test_blocked_basis_matches_an_unblocked_lanczos(ex, num_steps):
    """The basis lives in ~sqrt(m)-row blocks; every step count (block boundaries, a partial
    last block) must give the tridiagonal of a plain full-reorthogonalization Lanczos."""
    from hqjax.curvature.lanczos import basis_blocks, lanczos_runner, stack_basis

    M = ex.symmetric(32, seed=6)
    v0 = np.asarray(jax.random.normal(jax.random.key(4), (32,)), np.float64)
    alphas, betas, V, j = lanczos_runner(lambda x: jax.numpy.asarray(M, x.dtype) @ x, num_steps,
                                         jax.numpy.asarray(v0, jax.numpy.float32), "device", jax.random.key(5))(
        jax.numpy.asarray(v0, jax.numpy.float32))
    rows, nblocks = basis_blocks(num_steps)
    assert rows * nblocks >= num_steps and rows * (nblocks - 1) < num_steps
    assert int(j) == num_steps and len(V) == nblocks
    # float64 reference: Lanczos with full reorthogonalization by explicit projection
    Q = [v0 / np.linalg.norm(v0)]
    a_ref, b_ref = [], []
    for i in range(num_steps):
        w = M @ Q[-1]
        a_ref.append(Q[-1] @ w)
        B = np.stack(Q)
        for _ in range(2):
            w = w - B.T @ (B @ w)
        b_ref.append(np.linalg.norm(w))
        Q.append(w / b_ref[-1])
    np.testing.assert_allclose(alphas, a_ref, rtol=1e-4, atol=1e-4 * np.abs(M).max())
    np.testing.assert_allclose(betas[:-1], b_ref[:-1], rtol=1e-3, atol=1e-4 * np.abs(M).max())
    basis = np.asarray(stack_basis(V, num_steps))
    np.testing.assert_allclose(basis @ basis.T, np.eye(num_steps), atol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(basis * np.stack(Q[:num_steps]), 1)), 1.0, atol=1e-3)


def test_single_reorthogonalization_pass_reproduces_the_moments(cnn):
    """reorth_passes=1 (PyHessian's single Gram-Schmidt pass) still gives exact low moments and
    extreme nodes on the CNN Hessian; anything but 1 or 2 is refused."""
    n = cnn.H.shape[0]
    one = hqjax.spectral_density(cnn.matvec, cnn.params, jax.random.key(0), num_steps=20, num_runs=8, reorth_passes=1)
    two = hqjax.spectral_density(cnn.matvec, cnn.params, jax.random.key(0), num_steps=20, num_runs=8)
    for p in (1, 2):  # the same probes: the per-run quadratures agree, not only in expectation
        np.testing.assert_allclose(_run_moments(one, p), _run_moments(two, p), rtol=1e-3)
    np.testing.assert_allclose(np.max(one.nodes), cnn.evals.max(), rtol=1e-3)
    np.testing.assert_allclose(_run_moments(one, 1).mean(), np.trace(cnn.H) / n,
                               atol=4 * _run_moments(one, 1).std(ddof=1) / np.sqrt(8))
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ValueError, match="reorth_passes must be 1"):
            hqjax.spectral_density(cnn.matvec, cnn.params, jax.random.key(0), num_steps=4, reorth_passes=bad)
