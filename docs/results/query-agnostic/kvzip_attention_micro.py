"""Per-layer cost of KVzip's reconstruction attention against the prefill's causal SDPA (SmolLM2 shapes: 9 query
heads, 3 KV heads, head dim 64; a 2,048-token context, a 2,020-token chunk; one thread).

PYTHONPATH=src python docs/results/query-agnostic/kvzip_attention_micro.py
"""

import time

import torch

from kvsqueeze.policies.kvzip import softmax_reconstruction_attention, split_reconstruction_attention

torch.set_num_threads(1)
B, HQ, H, C, L, D = 1, 9, 3, 2020, 2048, 64
G = HQ // H
q = torch.randn(B, HQ, C, D)
k = torch.randn(B, H, L + C, D)
v = torch.randn(B, H, L + C, D)
columns = torch.arange(L)
scale = D**-0.5


def ms(fn, n: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


visible = torch.ones(C, L + C, dtype=torch.bool)
visible[:, L:] = torch.ones(C, C, dtype=torch.bool).tril()
additive = torch.zeros(C, L + C).masked_fill(~visible, float("-inf"))
k_all, v_all = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
qp, kp = torch.randn(B, HQ, L, D), torch.randn(B, HQ, L, D)


def sdpa_with_lse():
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k_all, v_all, 0.0, False, attn_mask=additive, scale=scale
    )[:2]


def sdpa_then_scores():
    out, lse = sdpa_with_lse()
    logits = torch.matmul(q.view(B, H, G * C, D), k[:, :, :L].transpose(-1, -2)) * scale
    return out, (logits.view(B, H, G, C, L) - lse.view(B, H, G, C, 1)).amax(dim=(2, 3)).exp()


fused_out, fused_scores = softmax_reconstruction_attention(q, k, v, scale, columns)
alt_out, alt_scores = sdpa_then_scores()
split_out, split_scores = split_reconstruction_attention(q, k, v, scale, columns)
print("split vs softmax max diff: output", (fused_out - split_out).abs().max().item(),
      "scores", (fused_scores - split_scores).abs().max().item())  # fmt: skip
print("max diff: output", (fused_out - alt_out.transpose(1, 2)).abs().max().item(),
      "scores", (fused_scores - alt_scores).abs().max().item())  # fmt: skip
logits = torch.matmul(q.view(B, H, G * C, D), k[:, :, :L].transpose(-1, -2))
times = {
    "prefill causal SDPA": ms(lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, kp, is_causal=True)),
    "softmax_reconstruction_attention (one softmax)": ms(
        lambda: softmax_reconstruction_attention(q, k, v, scale, columns)
    ),
    "split_reconstruction_attention (CPU default)": ms(lambda: split_reconstruction_attention(q, k, v, scale, columns)),
    "SDPA with the chunk mask, lse": ms(sdpa_with_lse),
    "context logits q·kᵀ": ms(lambda: torch.matmul(q.view(B, H, G * C, D), k[:, :, :L].transpose(-1, -2))),
    "amax over queries": ms(lambda: logits.amax(dim=2)),
    "SDPA + lse, scores exp(amax(q·k − lse))": ms(sdpa_then_scores),
}
for name, value in times.items():
    print(f"{name:45s} {value:7.0f} ms")
