"""hqjax.kernels.cpu.rewrite and accelerate: rewritten convolutions equal lax's, under every transform."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend import core as jcore

import hqjax
from hqjax.kernels.cpu import accelerate
from hqjax.kernels.cpu.conv_primitives import onednn_conv_p
from hqjax.kernels.cpu.rewrite import Rewrites, rewrite


def cpu_convolutions(fn):
    """The oneDNN rewrite alone (oneDNN for small windows, explicit layouts for the rest)."""
    return rewrite(fn, Rewrites(onednn=True))

CASES = [  # lhs, rhs, strides, padding, lhs dilation, rhs dilation, dimension numbers, feature groups
    ((4, 9, 9, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC"), 1),
    ((2, 4, 11, 10), (6, 4, 3, 3), (2, 3), ((2, 0), (0, 1)), (1, 1), (2, 1), ("NCHW", "OIHW", "NCHW"), 1),
    ((3, 12, 4), (5, 4, 2), (2,), ((1, 3),), (1,), (1,), ("NWC", "WIO", "NWC"), 1),
    ((2, 5, 6, 4), (3, 3, 4, 6), (1, 1), ((1, 2), (2, 1)), (2, 2), (1, 1), ("NHWC", "HWIO", "NHWC"), 1),  # base dilation: XLA
    ((2, 6, 6, 4), (3, 3, 2, 6), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC"), 2),  # groups: XLA
    ((2, 16, 16, 3), (16, 16, 3, 2), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC"), 1),  # big window: XLA
]


def _conv(case):
    _, _, strides, padding, lhs_dil, rhs_dil, dn, groups = case
    return lambda a, b: lax.conv_general_dilated(a, b, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                                                 dimension_numbers=dn, feature_group_count=groups)


def _operands(case, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal(case[0]), jnp.float32), jnp.asarray(r.standard_normal(case[1]), jnp.float32))


def _prims(fn, *args):
    return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


@pytest.mark.usefixtures("onednn")
@pytest.mark.parametrize("case", CASES)
def test_rewritten_convolution_equals_lax(case):
    f = _conv(case)
    a, b = _operands(case)
    want = jax.jit(f)(a, b)
    got = jax.jit(cpu_convolutions(f))(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    rhs_spatial = lax.conv_dimension_numbers(case[0], case[1], case[6]).rhs_spec[2:]
    eligible = case[4] == (1,) * len(case[4]) and case[7] == 1 and np.prod([case[1][d] for d in rhs_spatial]) <= 49
    assert ("onednn_conv_general_dilated" in _prims(cpu_convolutions(f), a, b)) == eligible


@pytest.mark.usefixtures("onednn")
@pytest.mark.parametrize("case", CASES[:3])
def test_jvp_vjp_vmap_of_rewritten_convolution(case):
    f = _conv(case)
    a, b = _operands(case)
    da, db = _operands(case, seed=1)
    g = cpu_convolutions(f)
    y0, t0 = jax.jvp(f, (a, b), (da, db))
    y1, t1 = jax.jit(lambda *x: jax.jvp(g, x[:2], x[2:]))(a, b, da, db)
    np.testing.assert_allclose(t1, t0, rtol=1e-5, atol=1e-5 * float(jnp.abs(t0).max()))
    ct = jnp.ones_like(y0)
    want = jax.vjp(f, a, b)[1](ct)
    got = jax.jit(lambda a, b: jax.vjp(g, a, b)[1](ct))(a, b)
    for w, x in zip(want, got):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
    batch = jnp.stack([a, da])
    np.testing.assert_allclose(jax.vmap(g, (0, None))(batch, b), jax.vmap(f, (0, None))(batch, b), rtol=1e-5, atol=1e-4)



@pytest.mark.usefixtures("onednn")
@pytest.mark.slow
def test_resnet_gradient_and_hvps_match_xla(resnet_loss):
    loss, params = resnet_loss(4)
    v = hqjax.tree.tree_random_like(jax.random.key(1), params, "rademacher")
    g0 = jax.grad(loss)(params)
    g1 = jax.jit(cpu_convolutions(jax.grad(loss)))(params)
    want = hqjax.hvp(loss, params, v)
    variants = {
        "hvp": jax.jit(accelerate(lambda p, v: hqjax.hvp(loss, p, v), mode="onednn"))(params, v),
        "linearized": accelerate(hqjax.hessian(loss, params, linearize=True), mode="onednn")(v),
        "hessian auto": accelerate(hqjax.hessian(loss, params))(v),
    }
    scale = lambda t: float(hqjax.tree.tree_norm(t))
    assert scale(jax.tree.map(jnp.subtract, g1, g0)) <= 1e-5 * scale(g0)
    for name, got in variants.items():
        assert scale(jax.tree.map(jnp.subtract, got, want)) <= 1e-4 * scale(want), name


@pytest.mark.usefixtures("onednn")
@pytest.mark.slow
def test_linearized_operator_keeps_weight_gradient_operands_pretransposed(resnet_loss):
    """The layouts XLA wants for weight-gradient convolutions are residuals, not per-product work."""
    loss, params = resnet_loss(batch=2)
    v = hqjax.tree.tree_random_like(jax.random.key(1), params, "rademacher")
    lin = jax.linearize(cpu_convolutions(jax.grad(loss)), params)[1]
    closed = jax.make_jaxpr(lin)(v)
    consts = set(closed.jaxpr.constvars)
    uses_residual = lambda e: any(x in consts for x in e.invars if not isinstance(x, jcore.Literal))
    wgrads = [e for e in closed.jaxpr.eqns if e.primitive.name == "conv_general_dilated" and uses_residual(e)]
    transposed = [e for e in closed.jaxpr.eqns if e.primitive.name == "transpose" and uses_residual(e)
                  and np.prod(e.invars[0].aval.shape) > 10_000]
    assert wgrads and not transposed
    # residual operands already sit in XLA:CPU's layout: no transposes left for XLA to insert
    assert all(tuple(e.params["dimension_numbers"].lhs_spec) == (0, 3, 1, 2) for e in wgrads)


def test_ggn_with_and_without_rewrite_agree():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
    y = jnp.array([0, 2])
    params = Tiny().init(jax.random.key(1), x)["params"]
    model_fn = lambda p: Tiny().apply({"params": p}, x)
    loss_fn = lambda out: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    v = hqjax.tree.tree_random_like(jax.random.key(2), params, "normal")
    want = hqjax.ggn(model_fn, loss_fn, params)(v)
    got = hqjax.ggn(accelerate(model_fn), loss_fn, params)(v)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_non_cpu_lowering_is_xlas_convolution():
    case = CASES[0]
    a, b = _operands(case)
    f = lambda a, b: onednn_conv_p.bind(a, b, **jax.make_jaxpr(_conv(case))(a, b).jaxpr.eqns[0].params)
    text = jax.jit(f).trace(a, b).lower(lowering_platforms=("cuda",)).as_text()
    assert "__onednn$convolution" not in text and "convolution" in text
