"""The native strided GEMM (hqjax.kernels.cpu.matmul) against lax.dot_general."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hqjax.kernels.cpu import _library, matmul as cpu_matmul
from hqjax.kernels.cpu.matmul import matmul_form, strided_form, strided_matmul
from hqjax.kernels.cpu.rewrite import Rewrites, rewrite


def _native_products(fn):
    """``fn`` with its eligible matrix products (and nothing else) rewritten to the native GEMM."""
    return rewrite(fn, Rewrites(native_matmul=True))

# (lhs shape, rhs shape, dimension numbers): every layout, edge tiles (M % 6, N % 16), more
# than one 256-step reduction block, several token axes, batches.
CASES = [
    ((300, 13), (300, 37), (((0,), (0,)), ((), ()))),                 # x^T dy
    ((3, 100, 20), (3, 100, 50), (((0, 1), (0, 1)), ((), ()))),       # two token axes
    ((70, 33), (33, 18), (((1,), (0,)), ((), ()))),                   # x W
    ((70, 33), (18, 33), (((1,), (1,)), ((), ()))),                   # x W^T
    ((33, 70), (18, 33), (((0,), (1,)), ((), ()))),                   # x^T W^T
    ((2, 3, 17, 8), (2, 3, 8, 21), (((3,), (2,)), ((0, 1), (0, 1)))),     # attention p v
    ((2, 3, 17, 8), (2, 3, 21, 8), (((3,), (3,)), ((0, 1), (0, 1)))),     # q k^T
    ((2, 3, 17, 8), (2, 3, 17, 21), (((2,), (2,)), ((0, 1), (0, 1)))),    # their gradients
    ((4, 530, 7), (4, 530, 16), (((1,), (1,)), ((0,), (0,)))),            # three reduction blocks
    ((2, 3, 5), (2, 3, 4), (((0, 1), (0, 1)), ((), ()))),             # tiny: one partial tile
    ((70, 40), (40, 18), (((1,), (0,)), ((), ()))),                   # x W, A packed by 8 x 8 transposes
    ((70, 264), (37, 264), (((1,), (1,)), ((), ()))),                 # x W^T, both transposed, K blocks 256 + 8
    ((270, 48), (48, 20), (((1,), (0,)), ((), ()))),                  # two row blocks of A (M > 264)
]


def _draw(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))




def _lax(lhs, rhs, dn):
    return lax.dot_general(lhs, rhs, dn, precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("ls,rs,dn", CASES)
def test_strided_form_describes_the_product(ls, rs, dn):
    # the strides alone, applied by numpy to the flat operands, give dot_general's output
    lhs, rhs = np.asarray(_draw(ls, 0)), np.asarray(_draw(rs, 1))
    f = strided_form(ls, rs, dn)
    assert f is not None
    a = np.lib.stride_tricks.as_strided(lhs.ravel(), (f.batch, f.m, f.k), (4 * f.a_batch, 4 * f.a_m, 4 * f.a_k))
    b = np.lib.stride_tricks.as_strided(rhs.ravel(), (f.batch, f.k, f.n), (4 * f.b_batch, 4 * f.b_k, 4 * f.b_n))
    want = np.asarray(_lax(lhs, rhs, dn))
    np.testing.assert_allclose(np.einsum("bmk,bkn->bmn", a, b).reshape(want.shape), want, rtol=1e-5, atol=1e-4)


def test_strided_form_refuses_what_strides_cannot_say():
    assert strided_form((4, 5, 6), (6, 5, 4), (((1, 2), (1, 0)), ((), ()))) is None  # k runs opposite ways
    assert strided_form((4, 5, 6), (4, 6, 7), (((2,), (1,)), ((), ()))) is None       # rhs free axes 0 and 2
    assert strided_form((4, 5, 6), (6, 7), (((2,), (0,)), ((), ()))) is not None
    assert strided_form((4, 5, 6), (5, 6, 4), (((2,), (1,)), ((0,), (2,)))) is None   # batch axis not leading
    assert strided_form((4, 5, 6, 7), (5, 7), (((3,), (1,)), ((), ()))) is not None   # free axes 0..2 together
    assert strided_form((4, 5, 6, 7), (5, 7), (((1, 3), (0, 1)), ((), ()))) is None   # k axes not adjacent


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("ls,rs,dn", CASES)
@pytest.mark.usefixtures("native")
def test_native_product_equals_lax(ls, rs, dn, isa, request, assert_close):
    if isa == "scalar":
        request.getfixturevalue("scalar_isa")
    lhs, rhs = _draw(ls, 2), _draw(rs, 3)
    got = jax.jit(functools.partial(strided_matmul, dimension_numbers=dn))(lhs, rhs)
    want = _lax(lhs, rhs, dn)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert_close(got, want)


def test_native_product_is_deterministic_and_empty_contraction_is_zero():
    lhs, rhs = _draw((2, 3, 900, 40), 4), _draw((2, 3, 900, 70), 5)
    dn = (((2,), (2,)), ((0, 1), (0, 1)))
    f = jax.jit(functools.partial(strided_matmul, dimension_numbers=dn))
    assert np.array_equal(f(lhs, rhs), f(lhs, rhs))
    z = strided_matmul(jnp.ones((3, 0, 4)), jnp.ones((3, 0, 5)), (((1,), (1,)), ((0,), (0,))))
    assert z.shape == (3, 4, 5) and not np.any(np.asarray(z))


def test_strided_matmul_differentiates_and_vmaps_like_lax(assert_close):
    lhs, rhs = _draw((40, 9), 6), _draw((40, 11), 7)
    dn = (((0,), (0,)), ((), ()))
    mine = lambda l, r: strided_matmul(l, r, dn)
    ref = lambda l, r: _lax(l, r, dn)
    tl, tr = _draw((40, 9), 8), _draw((40, 11), 9)
    assert_close(jax.jvp(mine, (lhs, rhs), (tl, tr))[1], jax.jvp(ref, (lhs, rhs), (tl, tr))[1])
    loss = lambda f: lambda l, r: jnp.sum(jnp.sin(f(l, r)))
    for g, w in zip(jax.grad(loss(mine), argnums=(0, 1))(lhs, rhs), jax.grad(loss(ref), argnums=(0, 1))(lhs, rhs)):
        assert_close(g, w)
    stack = jnp.stack([lhs, 2 * lhs])
    assert_close(jax.vmap(mine, (0, None))(stack, rhs), jax.vmap(ref, (0, None))(stack, rhs))


def _aval(shape, dtype=jnp.float32):
    return jax.core.ShapedArray(shape, dtype)


def test_matmul_form_takes_weight_gradients_and_batched_products_only():
    params = lambda dn: {"dimension_numbers": dn, "preferred_element_type": jnp.float32}
    wgrad = (((0, 1), (0, 1)), ((), ()))
    assert matmul_form(_aval((32, 64, 128)), _aval((32, 64, 512)), params(wgrad)) is not None   # encoder x^T dy
    assert matmul_form(_aval((256, 784)), _aval((256, 1024)), params((((0,), (0,)), ((), ())))) is None  # K < M: MLP
    assert matmul_form(_aval((256, 784)), _aval((256, 1024)), params((((0,), (0,)), ((), ()))),
                       transposed_output=True) is not None   # ... unless it saves XLA's transposed copy
    assert matmul_form(_aval((2048, 128)), _aval((128, 512)), params((((1,), (0,)), ((), ())))) is None  # x W: XLA's
    attn = (((3,), (3,)), ((0, 1), (0, 1)))
    assert matmul_form(_aval((32, 4, 64, 32)), _aval((32, 4, 64, 32)), params(attn)) is not None
    assert matmul_form(_aval((2, 4, 8, 8)), _aval((2, 4, 8, 8)), params(attn)) is None            # under MIN_FLOPS
    assert matmul_form(_aval((32, 4, 64, 32), jnp.bfloat16), _aval((32, 4, 64, 32), jnp.bfloat16), params(attn)) is None


def _attention_loss(params, x):
    q, k, v = (jnp.einsum("btd,de->bte", x, params[n]).reshape(2, 24, 2, 8).transpose(0, 2, 1, 3) for n in "qkv")
    a = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2), -1) @ v
    return jnp.sum(jnp.tanh(a.transpose(0, 2, 1, 3).reshape(2, 24, 16) @ params["o"]))


def test_rewrite_routes_transformer_products_and_keeps_values(monkeypatch, assert_close):
    monkeypatch.setattr(cpu_matmul, "MIN_FLOPS", 0)
    params = {n: _draw((16, 16), i) * 0.3 for i, n in enumerate("qkvo")}
    x = _draw((2, 24, 16), 9)
    grad = jax.grad(_attention_loss)
    rewritten = _native_products(grad)
    names = [e.primitive.name for e in jax.make_jaxpr(rewritten)(params, x).eqns]
    assert names.count("strided_matmul") >= 10, names   # 4 weight gradients + 2 x 3 attention products
    for g, w in zip(jax.tree.leaves(jax.jit(rewritten)(params, x)), jax.tree.leaves(jax.jit(grad)(params, x))):
        assert_close(g, w)
    # the Hessian-vector product of the rewritten gradient (tangents through the bilinear rule)
    v = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    hv = jax.jvp(lambda p: rewritten(p, x), (params,), (v,))[1]
    want = jax.jvp(lambda p: grad(p, x), (params,), (v,))[1]
    for g, w in zip(jax.tree.leaves(hv), jax.tree.leaves(want)):
        assert_close(g, w, rtol=1e-4)


def _mlp_loss(params, x):
    h = jnp.tanh(x @ params["w0"])
    return jnp.sum(jnp.tanh(h @ params["w1"]) ** 2)


def test_rewrite_folds_transposed_weight_gradients_into_the_product(monkeypatch, assert_close):
    monkeypatch.setattr(cpu_matmul, "MIN_FLOPS", 0)
    params = {"w0": _draw((20, 30), 12) * 0.3, "w1": _draw((30, 7), 13) * 0.3}
    x = _draw((50, 20), 14)
    grad = jax.grad(_mlp_loss)
    assert "transpose" in [e.primitive.name for e in jax.make_jaxpr(grad)(params, x).eqns]   # autodiff's (dy^T x)^T
    rewritten = _native_products(grad)
    names = [e.primitive.name for e in jax.make_jaxpr(rewritten)(params, x).eqns]
    assert "transpose" not in names and names.count("strided_matmul") == 2, names   # x^T dy written in place
    for g, w in zip(jax.tree.leaves(jax.jit(rewritten)(params, x)), jax.tree.leaves(jax.jit(grad)(params, x))):
        assert_close(g, w)
    v = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    _, lin = jax.linearize(lambda p: rewritten(p, x), params)
    want = jax.jvp(lambda p: grad(p, x), (params,), (v,))[1]
    for g, w in zip(jax.tree.leaves(jax.jit(lin)(v)), jax.tree.leaves(want)):
        assert_close(g, w, rtol=1e-4)


def test_rewrite_keeps_transposes_that_are_not_a_swapped_product(monkeypatch, assert_close):
    monkeypatch.setattr(cpu_matmul, "MIN_FLOPS", 0)
    a, b = _draw((40, 3, 5), 15), _draw((40, 6), 16)
    dn = (((0,), (0,)), ((), ()))

    def f(a, b):
        p = lax.dot_general(a, b, dn)                       # [3, 5, 6]
        return jnp.transpose(p, (1, 0, 2)), jnp.transpose(p, (2, 0, 1)) + p.sum()   # not a swap; p used twice

    rewritten = _native_products(f)
    assert [e.primitive.name for e in jax.make_jaxpr(rewritten)(a, b).eqns].count("transpose") == 2
    for g, w in zip(jax.jit(rewritten)(a, b), f(a, b)):
        assert_close(g, w)


def test_without_the_library_the_product_is_xlas(no_compiler, assert_close):
    ok, reason = cpu_matmul.native_matmul_status()
    assert not ok and "cannot build" in reason
    lhs, rhs = _draw((30, 5), 10), _draw((30, 7), 11)
    dn = (((0,), (0,)), ((), ()))
    assert_close(jax.jit(lambda l, r: strided_matmul(l, r, dn))(lhs, rhs), _lax(lhs, rhs, dn))


@pytest.mark.usefixtures("native")
def test_the_kernel_rejects_strides_past_an_operand():
    bad = dict(batch=1, m=4, n=4, k=8, a_batch=0, a_m=1, a_k=8, b_batch=0, b_k=4, b_n=1)  # A needs 60 > 32
    call = jax.ffi.ffi_call(_library.MATMUL_TARGET, jax.ShapeDtypeStruct((4, 4), jnp.float32))
    with pytest.raises(Exception, match="past an operand"):
        jax.block_until_ready(call(jnp.ones((4, 8)), jnp.ones((8, 4)), **{k: np.int64(v) for k, v in bad.items()}))
