import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax


def _assert_within(result, exact_total, exact_blocks, z=4.0):
    assert abs(float(result.total) - exact_total) <= z * float(result.total_stderr)
    for name, (t, se) in result.per_block().items():
        assert abs(t - exact_blocks[name]) <= z * se + 1e-6, (name, t, se, exact_blocks[name])


@pytest.fixture(scope="module")
def hutch64(cnn):
    return hqjax.trace(cnn.matvec, cnn.params, jax.random.key(0), num_probes=64, chunk_size=4)


def test_hutchinson_total_and_every_block_from_one_pass_within_4_stderr(cnn, hutch64):
    exact = {n: cnn.H[np.ix_(i, i)].trace() for n, i in cnn.idx.items()}
    res = hutch64
    assert res.block_names == ("conv1", "conv2", "dense") and int(res.num_probes) == 64
    _assert_within(res, cnn.H.trace(), exact)
    assert 0 < float(res.total_stderr) < 0.5 * abs(cnn.H.trace())


def test_hutch_plus_plus_is_unbiased_lower_variance_and_exact_for_low_rank(ex):
    blk, idx = ex.block_indices()
    # A decaying spectrum (the case Hutch++ is for): within 4 stderr, and a smaller stderr
    # than Hutchinson at the same number of matvecs.
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    M = (U * (100.0 * 0.6 ** np.arange(32))) @ U.T
    mv = ex.operator(M)
    pp = hqjax.trace(mv, ex.PARAMS, jax.random.key(0), num_probes=45, method="hutch++")
    hu = hqjax.trace(mv, ex.PARAMS, jax.random.key(0), num_probes=45)
    _assert_within(pp, M.trace(), {n: M[np.ix_(i, i)].trace() for n, i in idx.items()})
    assert float(pp.total_stderr) < 0.1 * float(hu.total_stderr)
    # Rank 3 <= sketch size 4: the low-rank part is the whole operator, so the answer is exact.
    M = ex.symmetric(32, seed=1, rank=3)
    r = hqjax.trace(ex.operator(M), ex.PARAMS, jax.random.key(2), num_probes=12, method="hutch++")
    np.testing.assert_allclose(float(r.total), M.trace(), rtol=1e-4)
    np.testing.assert_allclose(r.block_traces, [M[np.ix_(i, i)].trace() for i in idx.values()], rtol=1e-4, atol=1e-5)


def test_same_key_same_result_whatever_the_loop_and_chunking(ex):
    mv = ex.operator(ex.symmetric(32, seed=3))
    runs = [hqjax.trace(mv, ex.PARAMS, jax.random.key(7), num_probes=7, chunk_size=c, loop=l)
            for c, l in [(1, "host"), (3, "device"), (7, "host"), (1, "device")]]
    for r in runs[1:]:
        # equal up to float32 summation order (vmapped chunks vs single probes); the total is
        # a mean of +-terms, so the tolerance is absolute on the scale of the terms
        np.testing.assert_allclose(r.total, runs[0].total, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.block_traces, runs[0].block_traces, rtol=1e-5, atol=1e-5)
    other = hqjax.trace(mv, ex.PARAMS, jax.random.key(8), num_probes=7)
    assert float(other.total) != float(runs[0].total)


def test_gaussian_probes_and_tolerance_stop(ex):
    M = ex.symmetric(32, seed=4, rank=32) + 5 * np.eye(32)
    mv = ex.operator(M)
    r = hqjax.trace(mv, ex.PARAMS, jax.random.key(0), num_probes=400, dist="gaussian", tol=1e-2)
    assert 2 <= int(r.num_probes) < 400
    assert abs(float(r.total) - M.trace()) <= 4 * float(r.total_stderr)


def test_trace_inside_jit_matches_eager(cnn, hutch64):
    # Under jit the loop runs on the device; the probes (fold_in(key, j)) are the same.
    f = jax.jit(lambda p, key: hqjax.trace(hqjax.hessian(cnn.loss, p), p, key, num_probes=64, chunk_size=4))
    res = f(cnn.params, jax.random.key(0))
    np.testing.assert_allclose(res.total, hutch64.total, rtol=1e-4)
    np.testing.assert_allclose(res.block_traces, hutch64.block_traces, rtol=1e-4)


def test_result_is_a_pytree_and_round_trips_through_json(ex):
    r = hqjax.trace(ex.operator(np.eye(32)), ex.PARAMS, jax.random.key(0), num_probes=5)
    np.testing.assert_allclose(r.total, 32.0, rtol=1e-6)  # Rademacher: v.v = n exactly
    np.testing.assert_allclose(r.total_stderr, 0.0, atol=1e-5)
    assert len(jax.tree.leaves(r)) == 5
    back = hqjax.result_from_dict(json.loads(r.to_json()))
    assert back.block_names == r.block_names and back.method == "hutchinson"
    np.testing.assert_allclose(back.block_traces, r.block_traces)


def test_bad_operator_and_arguments_raise_clear_errors(ex):
    wrong = lambda v: {"a": v["a"]}
    with pytest.raises(ValueError, match="matvec\\(v\\) does not have the structure of params"):
        hqjax.trace(wrong, ex.PARAMS, jax.random.key(0), num_probes=2)
    with pytest.raises(FloatingPointError, match="not finite"):
        hqjax.trace(lambda v: jax.tree.map(lambda x: x * jnp.nan, v), ex.PARAMS, jax.random.key(0), num_probes=2)
    with pytest.raises(ValueError, match="hutch\\+\\+"):
        hqjax.trace(lambda v: v, ex.PARAMS, jax.random.key(0), num_probes=2, method="hutch++")
    with pytest.raises(ValueError, match="unknown probe distribution"):
        hqjax.trace(lambda v: v, ex.PARAMS, jax.random.key(0), dist="uniform")
    with pytest.raises(ValueError, match="loop must be one of"):
        hqjax.trace(lambda v: v, ex.PARAMS, jax.random.key(0), loop="gpu")
