"""BatchLLM: the global single-level prefix groups maximise the prompt tokens not recomputed; a batch run prefills each
group's prefix once and answers every request as if it ran alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvsqueeze import CompressedCache
from kvsqueeze.reuse.batchllm import Group, prefix_groups, run_batch
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def brute_force(prompts: list[list[int]], min_prefix: int) -> int:
    """The best saving over every assignment of requests to single-level groups (small batches only)."""
    n, best = len(prompts), 0
    for labels in itertools.product(range(n), repeat=n):
        saved = 0
        for label in set(labels):
            members = [prompts[i] for i in range(n) if labels[i] == label]
            common = 0
            while all(len(p) > common for p in members) and len({p[common] for p in members}) == 1:
                common += 1
            if len(members) > 1 and common >= min_prefix:
                saved += (len(members) - 1) * common
        best = max(best, saved)
    return best


def test_groups_are_single_level_and_save_the_most():
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]
    prompts = [a, b, [1, 2, 3, 7, 7, 7], [8, 8, 8], [1, 2, 3, 4, 5, 0]]
    groups = prefix_groups(prompts, min_prefix=2)
    members = sorted(m for g in groups for m in g.members)
    assert members == list(range(len(prompts)))  # every request in exactly one group
    # {0, 1, 2, 4} sharing 3 tokens saves 9, more than {0, 1, 4} sharing 4 (8)
    assert sum(g.saved for g in groups) == brute_force(prompts, 2) == 9
    assert Group(3, (0, 1, 2, 4)) in groups
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # random small batches against the exhaustive optimum
        batch = [torch.randint(0, 2, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(4)]  # fmt: skip
        assert sum(x.saved for x in prefix_groups(batch, 1)) == brute_force(batch, 1)


def test_a_batch_prefills_each_shared_prefix_once_and_answers_as_alone():
    model, tok = tiny_model("llama"), CharTokenizer()
    context = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    questions = [torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]
    other = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    prompts = [torch.cat([context, q], -1) for q in questions] + [other]
    answers, stats = run_batch(model, tok, "snapkv:window=8", prompts, max_new_tokens=4, ratio=0.5, min_prefix=16)
    assert stats["prefilled_tokens"] == 40 + 3 * 5 + 30 and stats["prompt_tokens"] == 3 * 45 + 30
    for prompt, got in zip(prompts[:3], answers[:3], strict=True):
        alone = CompressedCache(model, "snapkv:window=8", ratio=0.5)
        alone.prefill(model, context)  # what prefix reuse alone would do for this request
        want = model.generate(prompt, past_key_values=alone, max_new_tokens=4, do_sample=False)[0, 45:]
        assert torch.equal(got, want)
    assert answers[3].shape == (4,)
