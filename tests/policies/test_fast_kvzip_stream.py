"""Fast KVzip while the sequence grows: the decoding-time gating (every ``buffer`` generated tokens the gate scores of
the tokens that left the ``decode_window`` decide which of them stay, at the cache's ratio, ranked jointly over layers
and heads) and the chunked prefill (each chunk's tokens gated as they pass and evicted after the chunk, the recent
window kept, so memory stays bounded). Gate scores are scripted per position (``FastKVzip.gate_scores`` replaced), so
which tokens must go is known."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from kvsqueeze import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.storage import storage_bytes
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.fast_kvzip import TAIL_HIDDEN, TAIL_SCORES, FastKVzip, Gates, save_gates
from tests.conftest import tiny_model

H, LAYERS, D = 2, 2, 16  # the tiny Llama: KV heads, layers, head dim


@pytest.fixture
def gates(tmp_path):
    torch.manual_seed(5)
    return save_gates(Gates.for_model(tiny_model("llama").config), tmp_path / "gates.safetensors")


class Scripted:
    """Gate scores by position: ``fn(positions [M], layer) -> [H, M]``; every token passes the gate once, in order."""

    def __init__(self, fn):
        self.fn, self.seen = fn, defaultdict(int)

    def __call__(self, gates, layer_idx, hidden):  # set on the class: called unbound
        B, M = hidden.shape[:2]
        start = self.seen[layer_idx]
        self.seen[layer_idx] += M
        return self.fn(torch.arange(start, start + M), layer_idx)[None].expand(B, -1, -1).float()


def context(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def step(model, cache, token: int) -> None:
    with torch.no_grad():
        model(input_ids=torch.tensor([[token]]), **with_cache(model, cache), use_cache=True)


def kv_tokens(cache) -> int:
    return sum(int(layer.kept_lengths().sum()) for layer in cache.layers)


def kv_bytes(cache) -> int:
    """Bytes of the keys and values held (the tail and the blocks' tokens, not their per-head lengths)."""
    return sum(
        storage_bytes(layer.keys, layer.values, *[(b.keys, b.values) for b in layer.blocks]) for layer in cache.layers
    )


N = 60  # context tokens
HIGH = 0.9  # generated token p (0-based after the context) of (layer, head): high when (p + layer + head) % 4 == 0


def decode_scores(pos: torch.Tensor, layer: int) -> torch.Tensor:
    heads = torch.arange(H)[:, None]
    context_part = torch.sin(pos.float() * 1.7 + layer + heads)[..., :] * 0.3 + 0.5  # arbitrary, in (0, 1)
    generated = torch.where((pos - N + layer + heads) % 4 == 0, HIGH, 0.1).float()
    return torch.where(pos[None, :] < N, context_part, generated)


def test_decoding_evicts_exactly_the_low_score_generated_tokens(gates, monkeypatch):
    """After 2 × buffer decoded tokens the oldest ``buffer`` of them were judged: exactly the high-score ones stayed
    (each (layer, head) its own), the newest ``decode_window`` are still in the full-precision tail; before that
    nothing generated was evicted; then bytes held follow the ratio."""
    monkeypatch.setattr(FastKVzip, "gate_scores", Scripted(decode_scores))
    model = tiny_model("llama")
    buffer = window = 8
    cache = CompressedCache(model, f"fast_kvzip:gates={gates},buffer={buffer},decode_window={window}", ratio=0.75)
    cache.prefill(model, context(N))
    prefill_kept = [layer.kept_lengths()[0].clone() for layer in cache.layers]  # [H] per layer
    prefill_tokens = kv_tokens(cache)
    new_keys: dict[int, list[torch.Tensor]] = defaultdict(list)
    cache.attention_observer = lambda i, call, keys, values: new_keys[i].append(keys[0, :, -1].clone())
    tokens = torch.randint(10, 128, (4 * buffer,), generator=torch.Generator().manual_seed(1)).tolist()
    for t in tokens[: 2 * buffer - 1]:
        step(model, cache, t)
    assert kv_tokens(cache) == prefill_tokens + LAYERS * H * (2 * buffer - 1)  # nothing generated evicted yet
    step(model, cache, tokens[2 * buffer - 1])
    for i, layer in enumerate(cache.layers):
        generated = torch.stack(new_keys[i], dim=1)  # [H, 2 * buffer, D] keys of the generated tokens
        assert torch.equal(layer.keys[0], generated[:, buffer:])  # the recent window stays, in full precision
        (block,) = layer.blocks
        assert torch.equal(block.lengths[0], prefill_kept[i] + buffer // 4)
        keys = block.keys.split(block.lengths.flatten().tolist())
        for h in range(H):
            high = [p for p in range(buffer) if (p + i + h) % 4 == 0]
            assert torch.equal(keys[h][-len(high) :], generated[h, high])  # exactly the high-score ones stayed
        assert layer.state[TAIL_SCORES].shape[-1] + layer.state.get(TAIL_HIDDEN, torch.zeros(1, 0)).shape[1] == window
    for t in tokens[2 * buffer :]:
        step(model, cache, t)
    judged = 3 * buffer  # at 2, 3 and 4 buffers
    want = prefill_tokens + LAYERS * H * (judged // 4 + window)
    assert kv_tokens(cache) == want
    assert kv_bytes(cache) == want * 2 * D * 4  # float32 keys and values: bytes follow the kept tokens
    seen = N + 4 * buffer
    assert kv_bytes(cache) / cache.full_nbytes() == pytest.approx((prefill_tokens / (LAYERS * H) + 6 + 8) / seen)


def test_forks_evict_while_generating_and_the_parent_stays(gates, monkeypatch):
    """``model.generate`` from a fork gathers the fork's own hidden states: it evicts, the compressed context it was
    forked from keeps what it held."""
    monkeypatch.setattr(FastKVzip, "gate_scores", Scripted(decode_scores))
    model = tiny_model("llama")
    cache = CompressedCache(model, f"fast_kvzip:gates={gates},buffer=4,decode_window=4", ratio=0.5)
    ids = context(N)
    cache.prefill(model, ids)
    held, tokens = cache.nbytes(), kv_tokens(cache)
    fork = cache.fork()
    prompt = torch.cat([ids, context(5, seed=9)], dim=-1)  # a question after the context: only it is fed
    out = model.generate(prompt, past_key_values=fork, max_new_tokens=17, min_new_tokens=17, do_sample=False)
    assert out.shape[-1] == N + 5 + 17
    new = fork.get_seq_length() - N
    assert new == 5 + 16  # the question and 16 generated tokens went through the fork (the last was not fed back)
    assert all(layer.n_recent < 4 + 4 for layer in fork.layers)  # judged every 4 once the window was full
    recent = fork.layers[0].n_recent
    assert kv_tokens(fork) == tokens + LAYERS * H * ((new - recent) // 2 + recent)  # half of the judged ones stay
    assert cache.nbytes() == held and kv_tokens(cache) == tokens


def test_decoding_with_a_budget_keeps_generated_tokens(gates):
    """The decoding-time rule is the ratio's: with a token budget, generated tokens stay (a documented deviation)."""
    model = tiny_model("llama")
    cache = CompressedCache(model, f"fast_kvzip:gates={gates},buffer=4,decode_window=4", budget=20)
    cache.prefill(model, context(N))
    before = kv_tokens(cache)
    for t in range(12):
        step(model, cache, 20 + t)
    assert kv_tokens(cache) == before + LAYERS * H * 12


def test_chunked_prefill_stays_bounded(gates, monkeypatch):
    """A context of 200 tokens in chunks of 48 (window 16): after every chunk the cache holds the kept part of the
    chunks so far plus the recent window (the reference code's adjusted ratio, ranked jointly per chunk), never more
    than that plus one chunk, far below the one-forward peak; the whole context keeps the ratio."""
    monkeypatch.setattr(FastKVzip, "gate_scores", Scripted(lambda pos, layer: torch.rand(H, len(pos))))
    model = tiny_model("llama")
    n, chunk, window, ratio = 200, 48, 16, 0.75
    spec = f"fast_kvzip:gates={gates},chunk={chunk},window={window}"
    cache = CompressedCache(model, spec, ratio=ratio)
    after = []
    handle = model.register_forward_hook(lambda *_: after.append((kv_tokens(cache), kv_bytes(cache), cache.nbytes())))
    try:
        cache.prefill(model, context(n))
    finally:
        handle.remove()
    fraction = (0.25 * n - window) / (n - window)  # window = min(16, 25 % of 200)
    keeps = [max(-(-(32 * fraction) // 1), 4), *[-(-(48 * fraction) // 1)] * 3, -(-(8 * fraction) // 1) + window]
    assert len(after) == 5
    for c, (tokens, nbytes, total) in enumerate(after):
        per_head = sum(keeps[: c + 1]) + (window if c < 4 else 0)
        assert tokens == LAYERS * H * per_head  # exactly the kept part and the window
        assert nbytes == tokens * 2 * D * 4
        assert total - nbytes <= LAYERS * H * (window * 4 + 16) + 8 * n  # + the window's gate scores, lengths, ids
    assert sum(keeps) == pytest.approx(0.25 * n, abs=2)
    bound = LAYERS * H * ((sum(keeps) + window + chunk) * 2 * D * 4 + (window + chunk) * 4 + 16) + 8 * n
    assert cache.peak_bytes <= bound
    one = CompressedCache(model, f"fast_kvzip:gates={gates}", ratio=ratio)
    one.prefill(model, context(n))
    assert cache.peak_bytes < 0.7 * one.peak_bytes and one.peak_bytes >= one.full_nbytes()
    assert set(cache.shared_state) == {"config"} and all(layer.n_recent == 0 for layer in cache.layers)


def test_chunk_at_least_the_context_is_the_one_chunk_result(gates):
    """A chunk longer than the context (the paper's short-context rule: a window of 2 % of it) is one forward."""
    model = tiny_model("llama")
    ids = context(N, seed=3)
    caches = []
    for spec in (f"fast_kvzip:gates={gates}", f"fast_kvzip:gates={gates},chunk={N + 1}"):
        cache = CompressedCache(model, spec, ratio=0.5)
        logits = cache.prefill(model, ids)
        caches.append((cache, logits))
    (a, la), (b, lb) = caches
    assert torch.equal(la, lb)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert len(x.blocks) == len(y.blocks) == 1
        assert torch.equal(x.blocks[0].lengths, y.blocks[0].lengths)
        assert torch.equal(x.blocks[0].keys, y.blocks[0].keys) and torch.equal(x.blocks[0].values, y.blocks[0].values)


def test_chunked_prefill_then_decoding_attends_over_what_is_held(gates):
    """After a chunked prefill the model decodes over the kept tokens; the chunked prefill refuses sliding layers."""
    model = tiny_model("llama")
    cache = CompressedCache(model, f"fast_kvzip:gates={gates},chunk=32,window=8,buffer=4,decode_window=4", ratio=0.5)
    ids = context(100, seed=4)
    cache.prefill(model, ids)
    prompt = torch.cat([ids, context(3, seed=5)], dim=-1)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert out.shape[-1] == 113 and cache.get_seq_length() == 112 and all(layer.n_recent < 8 for layer in cache.layers)
    gemma = tiny_model("gemma3")
    with pytest.raises(KVSqueezeError, match="chunked prefill needs full-attention layers"):
        CompressedCache(gemma, f"fast_kvzip:gates={gates},chunk=16", ratio=0.5).prefill(gemma, context(40))


def test_chunked_prefill_keeps_the_top_gate_scores_of_each_chunk(gates, monkeypatch):
    """After each chunk the tokens that left the window are ranked jointly over layers and heads by the gate scores
    they got as they passed: what the cache keeps is exactly each chunk's top (the sinks and the final window too)."""
    produced: dict[int, list[torch.Tensor]] = defaultdict(list)

    def scores(pos, layer):
        out = torch.rand(H, len(pos), generator=torch.Generator().manual_seed(int(pos[0]) * 7 + layer))
        produced[layer].append(out)
        return out

    monkeypatch.setattr(FastKVzip, "gate_scores", Scripted(scores))
    model = tiny_model("llama")
    n, chunk, window = 200, 48, 16
    cache = CompressedCache(model, f"fast_kvzip:gates={gates},chunk={chunk},window={window}", ratio=0.75)
    keys: dict[int, list[torch.Tensor]] = defaultdict(list)
    cache.attention_observer = lambda i, call, k, v: keys[i].append(k[0, :, -call.queries.shape[2] :].clone())
    cache.prefill(model, context(n))
    gate = torch.stack([torch.cat(produced[i], -1) for i in range(LAYERS)])  # [layers, H, n]
    key = [torch.cat(keys[i], dim=1) for i in range(LAYERS)]  # [H, n, D] per layer
    fraction = (0.25 * n - window) / (n - window)
    kept = torch.zeros(LAYERS, H, n, dtype=torch.bool)
    for start, end, sinks, protect in [
        (0, 32, 4, 0),
        (32, 80, 0, 0),
        (80, 128, 0, 0),
        (128, 176, 0, 0),
        (176, 200, 0, 16),
    ]:
        span = gate[..., start:end].clone()
        span[..., :sinks] = float("inf")
        span[..., end - start - protect :] = float("inf")
        keep = max(-(-((end - start - protect) * fraction) // 1) + protect, sinks)
        top = span.flatten().topk(int(keep) * LAYERS * H).indices
        chosen = torch.zeros(span.numel(), dtype=torch.bool)
        chosen[top] = True
        kept[..., start:end] = chosen.view_as(span)
    for i, layer in enumerate(cache.layers):
        (block,) = layer.blocks
        assert torch.equal(block.lengths[0], kept[i].sum(-1))
        for h, segment in enumerate(block.keys.split(block.lengths.flatten().tolist())):
            assert torch.equal(segment, key[i][h, kept[i, h]])
