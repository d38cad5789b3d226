import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax
from hqjax.models import CNN, ResNet20


def _params():
    return {"params": {"a": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)},
                       "bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
                       "emb": {"embedding": jnp.ones((4, 2))}}}


def test_algebra_matches_raveled_numpy():
    p = _params()
    q = jax.tree.map(lambda x: x * 0.5 + 1.0, p)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    np.testing.assert_allclose(hqjax.tree.tree_dot(p, q), flat(p) @ flat(q), rtol=1e-6)
    np.testing.assert_allclose(flat(hqjax.tree.tree_axpy(2.0, p, q)), 2 * flat(p) + flat(q))
    np.testing.assert_allclose(hqjax.tree.tree_norm(p), np.linalg.norm(flat(p)), rtol=1e-6)
    assert hqjax.tree.tree_size(p) == flat(p).size


def test_ravel_and_flat_operator_match_ravel_pytree():
    from jax.flatten_util import ravel_pytree
    p = {**_params(), "scalar": jnp.float32(3.0), "t": jnp.arange(24.0).reshape(2, 3, 4).transpose(2, 0, 1)}
    want, unravel = ravel_pytree(p)
    got = jax.jit(hqjax.tree.tree_ravel)(p)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    # a non-diagonal linear map, so leaf order and offsets both matter; no transposes in it,
    # so the flat order is ravel_pytree's
    mv = lambda t: jax.tree.map(lambda x: 2.0 * x + jnp.sum(x), t)
    flat_mv, ravel, unravel2 = hqjax.tree.flat_operator(mv, p)
    x = jnp.arange(want.size, dtype=jnp.float32)
    np.testing.assert_allclose(jax.jit(flat_mv)(x), ravel_pytree(mv(unravel(x)))[0])
    np.testing.assert_array_equal(ravel_pytree(unravel2(x))[0], x)
    np.testing.assert_array_equal(ravel(p), want)


def test_flat_operator_of_transposing_operator_keeps_ravel_pytree_order():
    """Leaves the operator makes as transpose(y) are still stored in ravel_pytree's order;
    ravel, unravel and the flat matvec agree with each other and with the pytree operator."""
    from jax.flatten_util import ravel_pytree
    p = {"a": jnp.zeros((3, 5)), "b": jnp.zeros((7,)), "c": jnp.zeros((2, 3, 4))}
    r = np.random.default_rng(0)
    A, C = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((5, 5), (4, 4)))

    @jax.jit  # seen through a nested jit too
    def inner(x):
        return jnp.transpose(jnp.einsum("ij,kj->ik", A, x))  # [3, 5] made as transpose([5, 3])

    def mv(t):
        return {"a": inner(t["a"]), "b": 3.0 * t["b"], "c": jnp.transpose(jnp.einsum("abk,kl->lab", t["c"], C), (1, 2, 0))}

    flat_mv, ravel, unravel = hqjax.tree.flat_operator(mv, p)
    t = jax.tree.map(lambda x: jnp.asarray(r.standard_normal(x.shape), jnp.float32), p)
    x = ravel(t)
    np.testing.assert_array_equal(x, ravel_pytree(t)[0])
    for a, b in zip(jax.tree.leaves(unravel(x)), jax.tree.leaves(t)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(jax.jit(flat_mv)(x), ravel_pytree(mv(t))[0], rtol=1e-5, atol=1e-5)


def test_rademacher_probes_are_balanced_signs():
    p = {"w": jnp.zeros((1000, 333)), "s": jnp.zeros(()), "e": jnp.zeros((0, 4)), "v": jnp.zeros((33,))}
    v = jax.jit(hqjax.tree.tree_random_like, static_argnums=2)(jax.random.key(3), p, "rademacher")
    assert [x.shape for x in jax.tree.leaves(v)] == [x.shape for x in jax.tree.leaves(p)]
    w = np.asarray(v["w"])
    assert set(np.unique(w)) == {-1.0, 1.0} and float(v["s"]) in (-1.0, 1.0)
    assert abs(w.mean()) < 4 / np.sqrt(w.size)  # +-1 equally likely (4 standard errors)
    # neighbouring entries (bits of one random word) are uncorrelated
    assert abs(np.mean(w[:, 1:] * w[:, :-1])) < 4 / np.sqrt(w.size)
    other = hqjax.tree.tree_random_like(jax.random.key(4), p, "rademacher")
    assert np.mean(np.asarray(other["w"]) == w) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_random_like_shapes_and_values(dist):
    p = _params()
    v = hqjax.tree.tree_random_like(jax.random.key(0), p, dist)
    assert jax.tree.structure(v) == jax.tree.structure(p)
    leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)])
    if dist == "rademacher":
        assert set(np.unique(leaves)) == {-1.0, 1.0}
    else:
        assert len(np.unique(leaves)) == leaves.size
    w = hqjax.tree.tree_random_like(jax.random.key(0), p, dist)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(w)))
    with pytest.raises(ValueError, match="unknown probe distribution"):
        hqjax.tree.tree_random_like(jax.random.key(0), p, "uniform")


def test_blocks_default_rule_groups_by_owning_module():
    b = hqjax.blocks(_params())
    assert b.names == ("a", "emb")
    assert b.sizes == (9, 8)
    p = _params()
    r = b.restrict(p, "a")
    assert float(jnp.sum(r["params"]["emb"]["embedding"])) == 0.0
    assert jnp.array_equal(r["params"]["a"]["kernel"], p["params"]["a"]["kernel"])
    d = b.dots(p, p)
    np.testing.assert_allclose(d, [jnp.sum(jnp.arange(6.0) ** 2) + 3, 8.0])
    assert b.kernel(p, "a").shape == (2, 3)
    with pytest.raises(KeyError, match="no block named"):
        b.index("nope")


def test_blocks_names_match_flax_module_paths():
    v = ResNet20().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    b = hqjax.blocks(v["params"])
    assert b.names[0] == "fc" or "stem" in b.names
    assert "stage2/block0/conv1" in b.names and "stem" in b.names and "fc" in b.names
    assert len(b) == 20  # 19 convolutions + the classifier
    assert sum(b.sizes) < hqjax.tree.tree_size(v["params"])  # BatchNorm parameters are in no block
    c = CNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    assert hqjax.blocks(c).names == ("conv1", "conv2", "dense")


def test_custom_rule_and_structure_check():
    b = hqjax.blocks(_params(), rule=lambda p: "all")
    assert b.names == ("all",) and b.sizes == (hqjax.tree.tree_size(_params()),)
    with pytest.raises(ValueError, match="does not have the structure"):
        hqjax.tree.check_same_structure(_params(), {"params": {}})
    bad = jax.tree.map(lambda x: x[None], _params())
    with pytest.raises(ValueError, match="has shape"):
        hqjax.tree.check_same_structure(_params(), bad)


def test_kernel_view_merges_the_output_features_named_by_the_bias():
    from hqjax.tree import kernel_view_shape

    assert kernel_view_shape((3, 3, 4, 8), (8,)) == (3, 3, 4, 8)  # Conv: unchanged
    assert kernel_view_shape((16, 2, 8), (2, 8)) == (16, 16)  # attention q/k/v: (in, heads * head_dim)
    assert kernel_view_shape((2, 8, 16), (16,)) == (2, 8, 16)  # attention out: one output axis
    assert kernel_view_shape((16, 2, 8), None) == (16, 2, 8)  # no bias: the last axis
    assert kernel_view_shape((16, 2, 8), (3, 8)) == (16, 2, 8)  # a bias that is not the trailing axes
    w = jnp.arange(16 * 2 * 8, dtype=jnp.float32).reshape(16, 2, 8)
    params = {"attn": {"query": {"kernel": w, "bias": jnp.zeros((2, 8))}}, "head": {"kernel": jnp.ones((16, 3))}}
    blk = hqjax.blocks(params)
    np.testing.assert_array_equal(blk.kernel_view(params, "attn/query"), w.reshape(16, 16))
    assert blk.kernel_view(params, "head").shape == (16, 3)


def _stacked_params():
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    return {"embed": {"kernel": f(4, 3), "bias": f(3)},
            "blocks": {"fc1": {"kernel": f(2, 3, 3), "bias": f(2, 3)}, "fc2": {"kernel": f(2, 3, 3), "bias": f(2, 3)},
                       "norm": {"scale": f(2, 3)}},
            "head": {"kernel": f(3, 5)}}


def test_stacked_modules_give_one_block_per_layer_in_layer_order():
    p = _stacked_params()
    blk = hqjax.blocks(p, stacked=("blocks",))
    assert blk.names == ("blocks/fc1[0]", "blocks/fc2[0]", "blocks/fc1[1]", "blocks/fc2[1]", "embed", "head")
    assert blk.sizes == (12, 12, 12, 12, 15, 15)
    assert hqjax.blocks(p).names == ("blocks/fc1", "blocks/fc2", "embed", "head")  # without it: one block a stack
    assert [hqjax.tree.stack_layer(n) for n in blk.names[:2]] == [("blocks/fc1", 0), ("blocks/fc2", 0)]
    assert hqjax.tree.stack_layer("layers/0/fc") == ("layers/0/fc", None)  # an nnx.List path is no stack
    parts = blk.leaves_of(p, "blocks/fc2[1]")
    np.testing.assert_array_equal(parts["blocks/fc2/kernel"], p["blocks"]["fc2"]["kernel"][1])
    np.testing.assert_array_equal(blk.kernel(p, "blocks/fc1[0]"), p["blocks"]["fc1"]["kernel"][0])


def test_stacked_blocks_dots_and_restrict_match_slices():
    p = _stacked_params()
    q = jax.tree.map(lambda x: 0.5 * x + 1.0, p)
    blk = hqjax.blocks(p, stacked=("blocks",))
    dots = np.asarray(blk.dots(p, q))
    for i, name in enumerate(blk.names):
        want = sum(float(np.vdot(a, b)) for a, b in zip(blk.leaves_of(p, name).values(), blk.leaves_of(q, name).values()))
        np.testing.assert_allclose(dots[i], want, rtol=1e-5)
    r = blk.restrict(q, "blocks/fc1[1]")
    np.testing.assert_array_equal(r["blocks"]["fc1"]["kernel"][1], q["blocks"]["fc1"]["kernel"][1])
    assert not np.any(r["blocks"]["fc1"]["kernel"][0]) and not np.any(r["blocks"]["fc2"]["kernel"])
    assert not np.any(r["embed"]["kernel"]) and not np.any(r["blocks"]["norm"]["scale"])
    np.testing.assert_allclose(hqjax.tree.tree_dot(r, r), blk.dots(q, q)[blk.index("blocks/fc1[1]")], rtol=1e-5)


def test_stacked_modules_are_checked():
    p = _stacked_params()
    with pytest.raises(ValueError, match="stacked module 'stack' has no params"):
        hqjax.blocks(p, stacked=("stack",))
    with pytest.raises(ValueError, match="do not share one leading layer axis"):
        hqjax.blocks(p, stacked=("embed",))
