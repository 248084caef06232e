"""Peak cache bytes during EpiCache's block-wise prefill of a 4k-token conversation at budget 512 (issue 17's target:
<= budget + block + 5 %). One episode (the peak is per episode cache; each is built the same way).

PYTHONPATH=src python docs/results/convqa/measure_peak.py
"""

import json
import time

import torch

from kvsqueeze.bench.tasks import convqa
from kvsqueeze.models import load_model
from kvsqueeze.policies.epicache import EpiCache

torch.set_num_threads(1)
model, tok = load_model()
sample = convqa.generate(tok, samples=1, length=4096, seed=0)[0]
start = time.perf_counter()
epi = EpiCache(model, tok, budget=512, block=256, patch=64, episodes=1).prefill(convqa.messages_of(sample))
cfg = model.config
per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4 * cfg.num_hidden_layers
cache = epi.episodes[0].cache
result = {
    "conversation_tokens": len(epi.ids),
    "budget": 512,
    "block": 256,
    "kv_bytes_budget_plus_block": per_token * (512 + 256),
    "peak_cache_bytes": epi.peak_bytes,
    "peak_over_bound": epi.peak_bytes / (per_token * (512 + 256)),
    "max_bytes_after_a_block": max(epi.block_bytes),
    "final_cache_bytes": cache.nbytes(),
    "full_cache_bytes": cache.full_nbytes(),
    "layer_budgets": epi.layer_budgets,
    "sensitivity": [round(s, 5) for s in epi.sensitivity],
    "seconds": round(time.perf_counter() - start, 1),
}
print(json.dumps(result, indent=1))
