"""Tangent of conv/weight-grad/input-grad under forward-over-reverse: two convolutions vs one
convolution over concatenated operands (conv(dx,w)+conv(x,dw) = conv([dx,x],[w;dw]))."""
import time, numpy as np, jax, jax.numpy as jnp
from jax import lax
from _timing import tm  # run from any folder: the script's own folder is on sys.path
r = np.random.default_rng(0)
conv = lambda x, w: lax.conv_general_dilated(x, w, (1,1), ((1,1),(1,1)), dimension_numbers=("NHWC","HWIO","NHWC"))
for (N,H,C,Co) in [(128,32,16,16),(128,16,32,32),(128,8,64,64)]:
    g = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    x, xd, dy, dyd = g(N,H,H,C), g(N,H,H,C), g(N,H,H,Co), g(N,H,H,Co); w, wd = g(3,3,C,Co), g(3,3,C,Co)
    wg = lambda x, dy: jax.vjp(lambda w: conv(x,w), w)[1](dy)[0]
    xg = lambda dy, w: jax.vjp(lambda x: conv(x,w), x)[1](dy)[0]
    f2 = jax.jit(lambda x,xd,w,wd: conv(xd,w)+conv(x,wd)); f1 = jax.jit(lambda x,xd,w,wd: conv(jnp.concatenate([xd,x],-1), jnp.concatenate([w,wd],2)))
    w2 = jax.jit(lambda x,xd,dy,dyd: wg(xd,dy)+wg(x,dyd)); w1 = jax.jit(lambda x,xd,dy,dyd: wg(jnp.concatenate([xd,x],0), jnp.concatenate([dy,dyd],0)))
    x2 = jax.jit(lambda dy,dyd,w,wd: xg(dyd,w)+xg(dy,wd)); x1 = jax.jit(lambda dy,dyd,w,wd: xg(jnp.concatenate([dyd,dy],-1), jnp.concatenate([w,wd],3)))
    print((H,C), "fwd tangent two %.1f fused %.1f | wgrad tangent two %.1f fused %.1f | xgrad tangent two %.1f fused %.1f" % (
        tm(f2,x,xd,w,wd), tm(f1,x,xd,w,wd), tm(w2,x,xd,dy,dyd), tm(w1,x,xd,dy,dyd), tm(x2,dy,dyd,w,wd), tm(x1,dy,dyd,w,wd)), flush=True)
    print(" check", float(jnp.abs(f2(x,xd,w,wd)-f1(x,xd,w,wd)).max()), float(jnp.abs(w2(x,xd,dy,dyd)-w1(x,xd,dy,dyd)).max()), float(jnp.abs(x2(dy,dyd,w,wd)-x1(dy,dyd,w,wd)).max()))
