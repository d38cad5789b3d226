import jax
import numpy as np
import pytest

import hqjax
from hqjax.curvature import deflated_layer_traces


@pytest.mark.slow
def test_deflated_traces_match_exact_block_traces_of_a_coupled_cnn(coupled):
    p, f = coupled["params"], coupled["loss"]
    res = deflated_layer_traces(hqjax.hessian(f, p), p, jax.random.key(0), k=4, lanczos_steps=12, rtol=0.0, min_probes=32,
                                max_probes=32)
    assert res.method == "deflated" and np.all(np.asarray(res.num_probes) == 32)
    for name, (t, se) in res.per_block().items():
        assert abs(t - coupled["exact"][name]) <= 4 * se, (name, t, se, coupled["exact"][name])


def test_deflation_is_exact_for_low_rank_and_lowers_the_variance_with_a_dominant_spectrum(ex):
    blk, idx = ex.block_indices()
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    # A few dominant eigenvalues spread over every block (strong cross-block coupling)
    M = (U * np.r_[[200.0, 120.0, -80.0], 0.05 * rng.normal(size=29)]) @ U.T
    exact = np.array([M[np.ix_(i, i)].trace() for i in idx.values()])
    kw = dict(rtol=0.0, min_probes=40, max_probes=40, lanczos_steps=32)
    plain = deflated_layer_traces(ex.operator(M), ex.PARAMS, jax.random.key(1), k=0, **kw)
    defl = deflated_layer_traces(ex.operator(M), ex.PARAMS, jax.random.key(1), k=3, **kw)
    assert np.all(np.asarray(defl.stderr) < 0.05 * np.asarray(plain.stderr))
    assert np.all(np.abs(np.asarray(defl.traces) - exact) <= 4 * np.asarray(defl.stderr) + 1e-4)
    # rank 3, k = 3: the deflated part is the whole operator, the probes see zero
    L = (U[:, :3] * [5.0, 3.0, 1.0]) @ U[:, :3].T
    r = deflated_layer_traces(ex.operator(L), ex.PARAMS, jax.random.key(2), k=3, **kw)
    np.testing.assert_allclose(np.asarray(r.traces), [L[np.ix_(i, i)].trace() for i in idx.values()], atol=1e-4)


def test_rtol_stops_when_every_layer_reaches_it(ex):
    M = ex.symmetric(32, seed=4, rank=32) + 3 * np.eye(32)
    r = deflated_layer_traces(ex.operator(M), ex.PARAMS, jax.random.key(3), k=2, rtol=0.2, max_probes=500)
    n = int(np.asarray(r.num_probes)[0])
    assert 10 <= n < 500 and np.all(r.relative_stderr() <= 0.2)


def test_bad_k_fails_early(ex):
    with pytest.raises(ValueError, match="lanczos_steps"):
        deflated_layer_traces(ex.operator(np.eye(32)), ex.PARAMS, jax.random.key(0), k=5, lanczos_steps=3)
