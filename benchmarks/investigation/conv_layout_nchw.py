"""NHWC vs NCHW dimension numbers for the same convolutions; run under XLA_FLAGS variants
(default YNNPACK, --xla_cpu_experimental_ynn_fusion_type= for Eigen, --xla_cpu_use_xnnpack=false)."""
import time, sys, numpy as np, jax, jax.numpy as jnp
from jax import lax
from _timing import tm  # run from any folder: the script's own folder is on sys.path
rng = np.random.default_rng(0)
for (H,C,Co,s) in [(32,16,16,1),(16,32,32,1),(8,64,64,1),(32,16,32,2)]:
    row=[]
    for dn in ["NHWC", "NCHW"]:
        shp = (128,H,H,C) if dn=="NHWC" else (128,C,H,H)
        wdn = "HWIO" if dn=="NHWC" else "OIHW"
        wshp = (3,3,C,Co) if dn=="NHWC" else (Co,C,3,3)
        conv = lambda x, w: lax.conv_general_dilated(x, w, (s,s), ((1,1),(1,1)), dimension_numbers=(dn,wdn,dn))
        x = jnp.asarray(rng.standard_normal(shp), jnp.float32); w = jnp.asarray(rng.standard_normal(wshp)*0.1, jnp.float32)
        fwd = jax.jit(conv); y = fwd(x,w); dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        wg = jax.jit(lambda x,w,dy: jax.vjp(lambda w: conv(x,w), w)[1](dy)[0])
        xg = jax.jit(lambda x,w,dy: jax.vjp(lambda x: conv(x,w), x)[1](dy)[0])
        row.append(f"{dn}: fwd {tm(fwd,x,w):.1f} wgrad {tm(wg,x,w,dy):.1f} xgrad {tm(xg,x,w,dy):.1f}")
    print((H,C,Co,s), " | ".join(row), flush=True)
