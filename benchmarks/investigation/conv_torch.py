"""The same per-layer convolutions in PyTorch (oneDNN), for conv_formulations_jax.py. Run with
/work/torchvenv/bin/python."""
import time, numpy as np, torch
torch.set_num_threads(2)
def tm(f, n=15):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return np.min(ts)*1e3
for (H,C,Co,s) in [(32,16,16,1),(16,32,32,1),(8,64,64,1),(32,16,32,2)]:
    x = torch.randn(128,C,H,H); w = torch.randn(Co,C,3,3)*0.1
    y = torch.nn.functional.conv2d(x,w,stride=s,padding=1); dy = torch.ones_like(y)*0.01
    f = lambda: torch.nn.functional.conv2d(x,w,stride=s,padding=1)
    wg = lambda: torch.ops.aten.convolution_backward(dy, x, w, None, [s,s],[1,1],[1,1],False,[0,0],1,[False,False,True])
    wgr = lambda: torch.ops.aten.convolution_backward(dy, x, w, None, [s,s],[1,1],[1,1],False,[0,0],1,[False,True,False])
    xg = lambda: torch.ops.aten.convolution_backward(dy, x, w, None, [s,s],[1,1],[1,1],False,[0,0],1,[True,False,False])
    print((H,C,Co,s), f"torch fwd {tm(f):.1f} wgrad {tm(wgr):.1f} xgrad {tm(xg):.1f}", flush=True)
