"""Per-layer ResNet-20 convolution timings on XLA:CPU: lax.conv vs nine shifted matmuls ("slices")
vs im2col, forward / weight gradient / input gradient, batch 128 (min of 15 calls).
Run with XLA_FLAGS variants, e.g. --xla_cpu_use_onednn=true, --xla_cpu_use_xnnpack=true.
"""
import time, sys, numpy as np, jax, jax.numpy as jnp
from jax import lax
import functools
from _timing import tm as _tm
tm = functools.partial(_tm, n=15)
def conv(x, w, s=1, dn=("NHWC","HWIO","NHWC")):
    return lax.conv_general_dilated(x, w, (s,s), ((1,1),(1,1)), dimension_numbers=dn)
def conv_slices(x, w, s=1):
    N,H,W,C = x.shape; kh,kw,ci,co = w.shape
    xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
    Ho, Wo = (H-1)//s+1, (W-1)//s+1
    y = 0
    for i in range(3):
        for j in range(3):
            p = xp[:, i:i+s*(Ho-1)+1:s, j:j+s*(Wo-1)+1:s, :]
            y = y + jnp.einsum('nhwc,cd->nhwd', p, w[i,j])
    return y
def conv_im2col(x, w, s=1):
    N,H,W,C = x.shape; kh,kw,ci,co = w.shape
    xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
    Ho, Wo = (H-1)//s+1, (W-1)//s+1
    ps = [xp[:, i:i+s*(Ho-1)+1:s, j:j+s*(Wo-1)+1:s, :] for i in range(3) for j in range(3)]
    p = jnp.concatenate(ps, -1).reshape(N*Ho*Wo, 9*C)
    return (p @ w.reshape(9*C, co)).reshape(N,Ho,Wo,co)
rng = np.random.default_rng(0)
for (H,C,Co,s) in [(32,16,16,1),(16,32,32,1),(8,64,64,1),(32,16,32,2)]:
    x = jnp.asarray(rng.standard_normal((128,H,H,C)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3,3,C,Co))*0.1, jnp.float32)
    row = []
    for name, f in [("lax", conv), ("slices", conv_slices), ("im2col", conv_im2col)]:
        fwd = jax.jit(lambda x,w: f(x,w,s))
        y = fwd(x,w); dy = jnp.ones_like(y)*0.01
        wg = jax.jit(lambda x,w,dy: jax.vjp(lambda w: f(x,w,s), w)[1](dy)[0])
        xg = jax.jit(lambda x,w,dy: jax.vjp(lambda x: f(x,w,s), x)[1](dy)[0])
        row.append(f"{name}: fwd {tm(fwd,x,w):.1f} wgrad {tm(wg,x,w,dy):.1f} xgrad {tm(xg,x,w,dy):.1f}")
    print((H,C,Co,s), " | ".join(row), flush=True)
