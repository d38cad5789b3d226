import json
import jax
import numpy as np
import optax
import pytest

import hqjax


@pytest.fixture(scope="module")
def exact_top3(cnn, ex):
    return ex.top_by_magnitude(cnn.evals, 3)


def test_power_iteration_top3_within_1e4_relative(cnn, exact_top3, ex):
    r = hqjax.top_eigenvalues(cnn.matvec, cnn.params, jax.random.key(0), k=3, method="power", tol=1e-7, max_iters=400)
    np.testing.assert_allclose(r.eigenvalues, exact_top3, rtol=1e-4)
    # Eigenvectors: unit norm, and each satisfies H u = lambda u.
    for i in range(3):
        u = np.asarray(jax.flatten_util.ravel_pytree(jax.tree.map(lambda x: x[i], r.eigenvectors))[0], np.float64)
        np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-4)
        assert np.linalg.norm(cnn.H @ u - exact_top3[i] * u) < 2e-2 * abs(exact_top3[i])


def test_lanczos_top3_within_1e4_relative_with_fewer_matvecs(cnn, exact_top3, ex):
    lz = hqjax.top_eigenvalues(cnn.matvec, cnn.params, jax.random.key(0), k=3, method="lanczos", tol=1e-6)
    np.testing.assert_allclose(lz.eigenvalues, exact_top3, rtol=1e-4)
    pw = hqjax.top_eigenvalues(cnn.matvec, cnn.params, jax.random.key(0), k=3, method="power", tol=1e-7, max_iters=400)
    assert int(lz.num_iters[0]) < int(np.sum(pw.num_iters))
    one = hqjax.top_eigenvalues(cnn.matvec, cnn.params, jax.random.key(0), k=3, method="lanczos", tol=1e-6,
                                reorth_passes=1)
    np.testing.assert_allclose(one.eigenvalues, exact_top3, rtol=1e-4)


def test_pyhessian_defaults_converge_to_top_eigenvalue(cnn, exact_top3, ex):
    r = hqjax.top_eigenvalues(cnn.matvec, cnn.params, jax.random.key(3))
    assert int(r.num_iters[0]) < 100
    np.testing.assert_allclose(r.eigenvalues[0], exact_top3[0], rtol=1e-2)


def test_block_top_eigenvalues_match_eigh_of_diagonal_blocks(cnn, ex):
    res = hqjax.block_top_eigenvalues(cnn.matvec, cnn.params, jax.random.key(1), cnn.blocks, method="lanczos", tol=1e-6)
    assert list(res) == list(cnn.blocks.names)
    for name, i in cnn.idx.items():
        want = ex.top_by_magnitude(np.linalg.eigvalsh(cnn.H[np.ix_(i, i)]), 1)
        np.testing.assert_allclose(res[name].eigenvalues, want, rtol=1e-4)


def test_same_key_same_result_on_host_and_device_loops(ex):
    mv = ex.operator(ex.symmetric(32, seed=5))
    for method in ("power", "lanczos"):
        a = hqjax.top_eigenvalues(mv, ex.PARAMS, jax.random.key(4), k=2, method=method, loop="host")
        b = hqjax.top_eigenvalues(mv, ex.PARAMS, jax.random.key(4), k=2, method=method, loop="device")
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-5)
        np.testing.assert_array_equal(a.num_iters, b.num_iters)


def test_lanczos_survives_more_steps_than_the_rank(ex):
    M = ex.symmetric(32, seed=6, rank=3)
    r = hqjax.top_eigenvalues(ex.operator(M), ex.PARAMS, jax.random.key(0), k=3, method="lanczos", tol=1e-9)
    np.testing.assert_allclose(r.eigenvalues, ex.top_by_magnitude(np.linalg.eigvalsh(M), 3), rtol=1e-4)


def test_jitted_training_step_monitors_top_eigenvalue_every_n_steps(cnn, ex):
    opt = optax.sgd(0.1)
    every = 2

    @jax.jit
    def step(params, opt_state, lam, i):
        grads = jax.grad(cnn.loss)(params)
        lam = jax.lax.cond(
            i % every == 0,
            lambda: hqjax.top_eigenvalues(hqjax.hessian(cnn.loss, params), params, jax.random.key(0), max_iters=20).eigenvalues[0],
            lambda: lam)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, lam

    params, opt_state, lam = cnn.params, opt.init(cnn.params), np.float32(0.0)
    seen = []
    for i in range(3):
        if i == 2:
            want = hqjax.top_eigenvalues(hqjax.hessian(cnn.loss, params), params, jax.random.key(0), max_iters=20)
        params, opt_state, lam = step(params, opt_state, lam, i)
        seen.append(float(lam))
    assert seen[0] == seen[1] != 0.0  # computed at step 0, carried through step 1
    np.testing.assert_allclose(seen[2], want.eigenvalues[0], rtol=1e-4)
    assert seen[2] != seen[0]


def test_bad_arguments_raise(ex):
    with pytest.raises(ValueError, match="k must be between 1 and the number of parameters \\(32\\)"):
        hqjax.top_eigenvalues(lambda v: v, ex.PARAMS, jax.random.key(0), k=40)
    with pytest.raises(ValueError, match="method must be 'power' or 'lanczos'"):
        hqjax.top_eigenvalues(lambda v: v, ex.PARAMS, jax.random.key(0), method="arnoldi")


def _diag_operator(d):
    d = jax.numpy.asarray(d, jax.numpy.float32)
    return (lambda v: {"w": d * v["w"]}), {"w": jax.numpy.zeros_like(d)}


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_eigenvalues_sorted_by_magnitude_with_a_converged_flag(method, caplog):
    # A negative eigenvalue of the largest magnitude and a close pair below it.
    spectrum = np.array([-9.0, 8.5, 8.4, 1.0, 0.5, -0.2, 0.1, 0.05])
    mv, params = _diag_operator(spectrum)
    exact = spectrum[np.argsort(-np.abs(spectrum))][:3]
    good = hqjax.top_eigenvalues(mv, params, jax.random.key(1), k=3, method=method, tol=1e-9, max_iters=3000)
    np.testing.assert_allclose(good.eigenvalues, exact, rtol=1e-3)
    assert np.asarray(good.converged).tolist() == [True, True, True]
    for seed in range(6):  # stopped early, the estimates are poor but still reported in order
        with caplog.at_level("WARNING", logger="hqjax"):
            r = hqjax.top_eigenvalues(mv, params, jax.random.key(seed), k=3, method=method, tol=1e-12, max_iters=3)
        mags = np.abs(np.asarray(r.eigenvalues))
        assert np.all(np.diff(mags) <= 0), mags
        assert not np.asarray(r.converged).all()
    assert "did not reach tol" in caplog.text
    back = hqjax.result_from_dict(json.loads(r.to_json()))
    np.testing.assert_array_equal(back.converged, np.asarray(r.converged))
    np.testing.assert_array_equal(back.eigenvalues, np.asarray(r.eigenvalues))
