"""Per-layer cost of KVzip's reconstruction attention against the prefill's causal SDPA (SmolLM2 shapes, 2k context, one
thread). PYTHONPATH=src python docs/results/query-agnostic/kvzip_attention_micro.py"""

import time

import torch

from kvsqueeze.policies.kvzip import reconstruction_attention

torch.set_num_threads(1)
B, Hq, H, C, L, D = 1, 9, 3, 2020, 2048, 64
q = torch.randn(B, Hq, C, D)
k = torch.randn(B, H, L + C, D)
v = torch.randn(B, H, L + C, D)
cols = torch.arange(L)
s = D**-0.5


def t(f, n=3):
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


fused = t(lambda: reconstruction_attention(q, k, v, s, cols))
# prefill-like causal SDPA over L tokens
qp = torch.randn(B, Hq, L, D)
kp = torch.randn(B, Hq, L, D)
pre = t(lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, kp, is_causal=True))
# sdpa with mask + lse, then scores by amax(q.k - lse)
mask = torch.ones(C, L + C, dtype=torch.bool)
mask[:, L:] = torch.ones(C, C, dtype=torch.bool).tril()
ke = k.repeat_interleave(3, 1)
ve = v.repeat_interleave(3, 1)


def alt():
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, ke, ve, 0.0, False, attn_mask=torch.zeros(C, L + C).masked_fill(~mask, float("-inf")), scale=s
    )[:2]
    logits = torch.matmul(q.view(B, H, 3 * C, D), k[:, :, :L].transpose(-1, -2)) * s
    best = (logits.view(B, H, 3, C, L) - lse.view(B, H, 3, C, 1)).amax(dim=(2, 3)).exp()
    return out, best


try:
    a = t(alt)
    o1, b1 = reconstruction_attention(q, k, v, s, cols)
    o2, b2 = alt()
    print("alt max diff out", (o1 - o2.transpose(1, 2)).abs().max().item(), "scores", (b1 - b2).abs().max().item())
except Exception as e:
    a = None
    print("alt failed", e)
print(f"fused {fused * 1e3:.0f} ms  prefill-causal-sdpa {pre * 1e3:.0f} ms  sdpa+lse+amax {a and a * 1e3:.0f} ms")
am = torch.zeros(C, L + C).masked_fill(~mask, float("-inf"))
sd = t(lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, ke, ve, 0.0, False, attn_mask=am, scale=s))
mm = t(lambda: torch.matmul(q.view(B, H, 3 * C, D), k[:, :, :L].transpose(-1, -2)))
lg = torch.matmul(q.view(B, H, 3 * C, D), k[:, :, :L].transpose(-1, -2))
am2 = t(lambda: lg.amax(dim=2))
print(f"sdpa-mask {sd * 1e3:.0f}  qk-matmul {mm * 1e3:.0f}  amax {am2 * 1e3:.0f}")
