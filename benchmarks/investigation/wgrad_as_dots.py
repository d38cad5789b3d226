"""Weight gradient of a 3x3 convolution written as matrix products (im2col, split-K, per-tap,
channel-major layout) against XLA's own convolution; min of 11 calls."""
import time, numpy as np, jax, jax.numpy as jnp
from jax import lax
from _timing import tm  # run from any folder: the script's own folder is on sys.path
r = np.random.default_rng(0)
for (N,H,C,Co) in [(128,32,16,16),(128,16,32,32),(128,8,64,64)]:
    x = jnp.asarray(r.standard_normal((N,H,H,C)),jnp.float32); dy = jnp.asarray(r.standard_normal((N,H,H,Co)),jnp.float32)
    w = jnp.zeros((3,3,C,Co))
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1,1), ((1,1),(1,1)), dimension_numbers=("NHWC","HWIO","NHWC"))
    A = jax.jit(lambda x, dy: jax.vjp(lambda w: conv(x,w), w)[1](dy)[0])
    def patches(x):
        xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
        return jnp.concatenate([xp[:, i:i+H, j:j+H, :] for i in range(3) for j in range(3)], -1)
    B = jax.jit(lambda x, dy: jnp.einsum('nhwk,nhwo->ko', patches(x), dy))
    def Cs(S):
        return jax.jit(lambda x, dy: jnp.einsum('spk,spo->sko', patches(x).reshape(S,-1,9*C), dy.reshape(S,-1,Co)).sum(0))
    def taps(x, dy):
        xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
        return jnp.stack([jnp.einsum('nhwc,nhwo->co', xp[:, i:i+H, j:j+H, :], dy) for i in range(3) for j in range(3)])
    T = jax.jit(taps)
    # channel-major layout: x as [C,N,H,W]
    xc = jnp.transpose(x, (3,0,1,2)); dyc = jnp.transpose(dy, (3,0,1,2))
    def pc(xc):
        xp = jnp.pad(xc, ((0,0),(0,0),(1,1),(1,1)))
        return jnp.concatenate([xp[:, :, i:i+H, j:j+H] for i in range(3) for j in range(3)], 0)
    D = jax.jit(lambda xc, dyc: jnp.einsum('knhw,onhw->ko', pc(xc), dyc))
    Dp = jax.jit(lambda xc, dyc: jnp.einsum('kp,op->ko', pc(xc).reshape(9*C,-1), dyc.reshape(Co,-1)))
    print((N,H,C,Co), "xla-conv %.1f | im2col-dot %.1f | split8 %.1f | split128 %.1f | taps %.1f | CNHW-im2col %.1f %.1f" % (tm(A,x,dy), tm(B,x,dy), tm(Cs(8),x,dy), tm(Cs(128),x,dy), tm(T,x,dy), tm(D,xc,dyc), tm(Dp,xc,dyc)), flush=True)
