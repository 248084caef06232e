"""APE — "APE: Faster and Longer Context-Augmented Generation via Adaptive Parallel Encoding" (Yang, Chen, Chen;
arXiv 2502.05431).

Parallel encoding: a shared prefix is encoded once, and every context is encoded *alone* after it (attending to the
prefix and itself, positions reused: each context starts right after the prefix), so each context's cache can be
computed once and reused in any combination. APE aligns the query's attention with sequential encoding in three
steps: the shared prefix (already in the layout above), an attention *temperature* ``T`` on the logits of the
context tokens, and a *scaling factor* ``S`` on their log-sum-exp: the query's attention is the context part
``softmax(q·k / (√d · T))`` and the other part (prefix, query and generated tokens, at temperature 1) combined with
weights ``softmax([S · lse_context, lse_other])``.

Here the contexts live in one :class:`APEBlock` of each layer, whose partial attention applies ``T`` and returns
``S · lse``; the layer's usual log-sum-exp merge of its partials (prefix block, context block, tail) is then exactly
APE's combination. Positions: APE puts the query right after the longest context; a kvsqueeze cache's length is
what ``generate`` counts positions from, so every cached key is moved ``Σ n_i − max n_i`` positions later instead
(RoPE being relative, every query–key distance is APE's). Deviations: ``T`` and ``S`` are per-task
hyperparameters in the paper; the defaults here (``T = S = 0.8``) are one setting for every task, chosen on 16
``rag:6`` samples with SmolLM2 and confirmed on 64 others (``docs/results/rag/ape-default/``); ``T = S = 1`` is plain
parallel encoding. Full-attention models with RoPE over the whole head only.
"""

from __future__ import annotations

import math
import numbers

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.storage import DenseBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.reuse.kvlink import shift_keys
from kvsqueeze.schedules.rerotate import rope_of

TEMPERATURE = 0.8  # default T on the context tokens' logits (module docstring: how it was chosen)
SCALE = 0.8  # default S on the contexts' log-sum-exp


class APEBlock(DenseBlock):
    """The parallel-encoded contexts of one layer: attended at temperature ``T``, log-sum-exp scaled by ``S``."""

    def __init__(self, keys, values, lengths, temperature: float, scale: float):
        super().__init__(keys, values, lengths)
        self.temperature, self.scale = temperature, scale

    def attend(self, q, scaling):
        out, lse = super().attend(q, scaling / self.temperature)
        return out, lse * self.scale

    def attend_masked(self, q, scaling, softcap=None, key_mask=None):
        out, lse = super().attend_masked(q, scaling / self.temperature, softcap=softcap, key_mask=key_mask)
        return out, lse * self.scale


@torch.no_grad()
def encode_contexts(model, prefix_ids: torch.Tensor, contexts: list[torch.Tensor]) -> tuple[CompressedCache, list]:
    """The shared prefix's cache and every context's own cache after it (each context sees the prefix and itself;
    positions reused). Each is what a store would keep and reuse."""
    prefix = CompressedCache(model, "none")
    prefix.prefill(model, prefix_ids)
    encoded = []
    for ids in contexts:
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[-1] == 0:
            raise KVSqueezeError("APE encodes one non-empty context at a time: token ids of shape [1, n]")
        cache = prefix.fork()
        cache.expect(torch.cat([prefix_ids, ids], dim=-1))
        model(input_ids=ids.to(model.device), **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        encoded.append(cache)
    return prefix, encoded


def check_parameters(temperature: float, scale: float) -> None:
    """APE's temperature and scale: finite numbers > 0 (nan or inf would turn every attention weight into nan)."""
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) and v > 0 for v in (temperature, scale)):
        raise KVSqueezeError(f"APE's temperature and scale must be finite numbers > 0, got {temperature} and {scale}")


@torch.no_grad()
def ape_cache(
    model,
    prefix_ids: torch.Tensor,
    contexts: list[torch.Tensor],
    temperature: float = TEMPERATURE,
    scale: float = SCALE,
) -> CompressedCache:
    """A cache holding the shared prefix and the parallel-encoded ``contexts`` for APE's attention; ``generate`` over
    ``cat(prefix, contexts…, query)`` then prefills only the query."""
    if not contexts:
        raise KVSqueezeError("APE needs at least one context")
    check_parameters(temperature, scale)
    prefix, encoded = encode_contexts(model, prefix_ids, contexts)
    return combine(model, prefix, encoded, temperature, scale)


@torch.no_grad()
def combine(
    model,
    prefix: CompressedCache,
    encoded: list[CompressedCache],
    temperature: float = TEMPERATURE,
    scale: float = SCALE,
) -> CompressedCache:
    """APE's cache from caches computed before (e.g. kept in a store): ``prefix`` holds the shared prefix alone,
    each of ``encoded`` that prefix followed by one context (see :func:`encode_contexts`)."""
    if not encoded:
        raise KVSqueezeError("APE needs at least one context")
    check_parameters(temperature, scale)
    p = prefix.get_seq_length()
    if prefix.tokens is None or any(
        c.tokens is None or c.tokens.shape[-1] <= p or not torch.equal(c.tokens[:, :p], prefix.tokens) for c in encoded
    ):
        raise KVSqueezeError("APE's contexts must each be encoded after the shared prefix: use encode_contexts")
    rope = rope_of(model)
    lengths = [c.get_seq_length() - p for c in encoded]
    shift = sum(lengths) - max(lengths)  # the query then sits right after the longest context, as in APE
    out = CompressedCache(model, "none")
    for idx, layer in enumerate(out.layers):
        head = prefix.layers[idx]
        B, H, _, D = head.keys.shape
        pk = shift_keys(head.keys, shift, rope)
        ck = torch.cat([shift_keys(c.layers[idx].keys[:, :, p:], shift, rope) for c in encoded], dim=2)
        cv = torch.cat([c.layers[idx].values[:, :, p:] for c in encoded], dim=2)
        layer.lazy_initialization(head.keys, head.values)
        layer.blocks = [
            DenseBlock(pk.reshape(-1, D), head.values.reshape(-1, head.values.shape[-1]), torch.full((B, H), p)),
            APEBlock(ck.reshape(-1, D), cv.reshape(-1, cv.shape[-1]), torch.full((B, H), sum(lengths)),
                     temperature, scale),
        ]  # fmt: skip
        layer.seen = p + sum(lengths)
        layer.compressions = 1  # the layer attends over its blocks from now on
    out.tokens = torch.cat([prefix.tokens, *(c.tokens[:, p:] for c in encoded)], dim=-1).cpu()
    return out
