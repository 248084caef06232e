"""BatchLLM — "BatchLLM: Optimizing Large Batched LLM Inference with Global Prefix Sharing and Throughput-oriented
Token Batching" (Zheng et al., arXiv 2412.03594).

For a batch of requests known in advance, the common prefixes are identified *globally* instead of left to an LRU
cache: the prompts form a prefix tree, and a dynamic programme over it chooses a single level of prefix groups —
every request belongs to exactly one group (or none), and a group's prefix is prefilled once — maximising the
prompt tokens not recomputed, ``Σ (members − 1) × prefix length``. Requests of a group are scheduled together (the
shared cache lives only while its group runs), groups whose requests decode more per prompt token first.

Here :func:`prefix_groups` is the tree and the programme; :func:`run_batch` prefills each group's prefix once into a
:class:`~kvsqueeze.core.cache.CompressedCache` of the requested method (so with a compressing method the shared prefix
is stored compressed) and answers every member from a fork with ``model.generate``. Deviation: the paper's
throughput-oriented token batching and its fused prefix-shared attention kernel are serving-engine work left out; a
group's members run one after another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError


@dataclass(frozen=True)
class Group:
    prefix: int  # shared prefix length in tokens (0: the members share nothing worth a group)
    members: tuple[int, ...]  # request indices

    @property
    def saved(self) -> int:
        return (len(self.members) - 1) * self.prefix


def prefix_groups(prompts: list[list[int]], min_prefix: int = 1) -> list[Group]:
    """The single-level prefix groups that save the most prompt tokens (see the module docstring); prefixes shorter
    than ``min_prefix`` are not worth a group. Every request is in exactly one returned group."""
    root: dict = {}
    for i, prompt in enumerate(prompts):
        node = root
        for token in prompt:
            node = node.setdefault(int(token), {})
            node.setdefault("#", []).append(i)  # the requests passing through this node
    best: dict[int, tuple[int, list[Group]]] = {}

    def solve(node: dict, depth: int) -> tuple[int, list[Group]]:
        """(tokens saved, groups) for the requests below ``node`` (iterative post-order: prompts are long)."""
        stack = [(node, depth, False)]
        while stack:
            current, d, expanded = stack.pop()
            children = [(k, v) for k, v in current.items() if k != "#"]
            if not expanded:
                stack.append((current, d, True))
                stack.extend((child, d + 1, False) for _, child in children)
                continue
            members = current.get("#", [])
            below = [best.pop(id(child)) for _, child in children]
            split_saved = sum(s for s, _ in below)
            split_groups = [g for _, groups in below for g in groups]
            covered = {m for g in split_groups for m in g.members}
            ending = [m for m in members if m not in covered]  # prompts that end here
            whole = (len(members) - 1) * d if d >= min_prefix and len(members) > 1 else -1
            if whole > split_saved:
                best[id(current)] = (whole, [Group(d, tuple(members))])
            else:
                best[id(current)] = (split_saved, split_groups + ([Group(0, tuple(ending))] if ending else []))
        return best.pop(id(node))

    _, groups = solve(root, 0)
    singles = [m for g in groups if g.prefix == 0 for m in g.members]
    grouped = [g for g in groups if g.prefix > 0]
    return grouped + [Group(0, (m,)) for m in sorted(singles)]


@torch.no_grad()
def run_batch(
    model, tokenizer, method, prompts: list[torch.Tensor], *, max_new_tokens: int = 32, ratio=None,
    budget: int | None = None, min_prefix: int = 16,
) -> tuple[list[torch.Tensor], dict]:  # fmt: skip
    """Answer every prompt ``[1, L_i]``: each group's prefix prefilled once (with ``method``), every member generated
    from a fork of it; returns the new token ids of each request (in the given order) and what was prefilled."""
    if not prompts:
        raise KVSqueezeError("run_batch needs at least one prompt")
    if any(p.dim() != 2 or p.shape[0] != 1 for p in prompts):
        raise KVSqueezeError("every prompt is one request: token ids of shape [1, L]")
    groups = prefix_groups([p[0].tolist() for p in prompts], min_prefix)
    # groups of requests that decode more per prompt token first (the paper's order; here: shorter prompts)
    groups.sort(key=lambda g: -max_new_tokens / max(sum(prompts[m].shape[-1] for m in g.members), 1))
    answers: list[torch.Tensor | None] = [None] * len(prompts)
    prefilled = 0
    for group in groups:
        shared = None
        if group.prefix:
            prefix = prompts[group.members[0]][:, : group.prefix]
            shared = CompressedCache(model, method, ratio=ratio, budget=budget, tokenizer=tokenizer)
            shared.prefill(model, prefix)
            prefilled += group.prefix
        for m in group.members:
            ids = prompts[m].to(model.device)
            if shared is not None and ids.shape[-1] > group.prefix:
                cache = shared.fork()
                cache.expect(ids)
            else:
                cache = CompressedCache(model, method, ratio=ratio, budget=budget, tokenizer=tokenizer)
            prefilled += ids.shape[-1] - cache.get_seq_length()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(model, cache),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=getattr(tokenizer, "pad_token_id", None))  # fmt: skip
            answers[m] = out[0, ids.shape[-1] :]
        del shared  # the group's shared prefix lives only while its group runs
    stats = {"prefilled_tokens": prefilled, "prompt_tokens": sum(p.shape[-1] for p in prompts),
             "groups": [(g.prefix, list(g.members)) for g in groups]}  # fmt: skip
    return answers, stats
