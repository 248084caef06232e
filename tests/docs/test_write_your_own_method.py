"""docs/write-your-own-method.md's examples are executed: every ``python`` block as written, in order, in one
namespace (the blocks build on each other), on a tiny random-weight Llama with a character tokenizer standing in
for ``kvsqueeze.load_model()``. Then the scorer and the codec they define are checked: the scorer keeps exactly the
tokens its own score ranks highest, the codec stores half-precision tensors in half the bytes, and both run inside
``model.generate``.

The blocks run in a module of their own (as a script would: pydantic resolves the fields' annotations through
``sys.modules``). They register ``doc_keynorm`` and ``doc_half``; ``@register`` refuses a name twice, so they run
once per test module, and the registry is put back afterwards (other tests iterate over every registered method).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import BatchEncoding, DynamicCache

import kvsqueeze
from kvsqueeze import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.storage import DenseBlock
from kvsqueeze.policies.base import PROTECTED
from kvsqueeze.prompts import chat
from kvsqueeze.spec import REGISTRY
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "write-your-own-method.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)  # as in test_readme_examples.py
NAMES = ("doc_keynorm", "doc_half")


def blocks(lang: str = "python") -> list[str]:
    return [body for kind, body in BLOCK.findall(DOC.read_text(encoding="utf-8")) if kind == lang]


class Tokenizer(CharTokenizer):
    """The character tokenizer with the calls of an HF tokenizer the doc makes (no template: messages as plain text,
    as ``kvsqueeze.prompts.chat`` writes them)."""

    def __call__(self, text: str, return_tensors=None, add_special_tokens: bool = True) -> BatchEncoding:
        ids = torch.tensor([self.encode(text)])
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def apply_chat_template(self, messages, add_generation_prompt=False, return_tensors=None, return_dict=False):
        assert add_generation_prompt and return_tensors == "pt" and return_dict
        return self(chat(self, messages))


@contextlib.contextmanager
def executed(tiny: bool):
    """Run the blocks in order in a fresh module; yields the namespace after each block (a shallow copy) and what
    they printed. ``tiny``: ``kvsqueeze.load_model()`` gives the tiny random Llama and the character tokenizer.
    The registry is put back as it was on exit."""
    before = dict(REGISTRY)
    for name in NAMES:  # defined by an earlier run in this process: the blocks register them again
        REGISTRY.pop(name, None)
    module = types.ModuleType("write_your_own_method")
    after: list[dict] = []
    printed = io.StringIO()
    sys.modules[module.__name__] = module
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            if tiny:
                patch.setattr(kvsqueeze, "load_model", lambda *args, **kwargs: (tiny_model("llama"), Tokenizer()))
            for index, code in enumerate(blocks()):
                exec(compile(code, f"{DOC.name} python block {index + 1}", "exec"), module.__dict__)
                after.append(dict(module.__dict__))
        yield after, printed.getvalue()
    finally:
        REGISTRY.clear()
        REGISTRY.update(before)
        sys.modules.pop(module.__name__, None)


@pytest.fixture(scope="module")
def doc():
    with executed(tiny=True) as result:
        yield result


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_the_blocks_run_and_register_both_components(doc):
    after, printed = doc
    assert len(after) == 4, "the doc should hold four python blocks: scorer, its use, codec, its use"
    assert {"doc_keynorm", "doc_half"} <= set(REGISTRY)
    assert REGISTRY["doc_keynorm"].axis == "scorer" and REGISTRY["doc_half"].axis == "codec"
    assert "bytes held" in printed and "doc_half: torch.float16" in printed
    assert "doc_keynorm+doc_half:dtype=bfloat16: torch.bfloat16" in printed


def test_the_scorer_example_holds_fewer_bytes_than_a_full_cache(doc):
    cache = doc[0][1]["cache"]  # block 2: doc_keynorm:sinks=8+kivi:bits=4 at ratio 0.5 through model.generate
    assert cache.method.spec() == "doc_keynorm:sinks=8+kivi:bits=4"
    assert all(layer.compressed for layer in cache.layers)
    assert cache.nbytes() < cache.full_nbytes() / 2


def test_the_scorer_keeps_exactly_its_top_scored_tokens(doc, model):
    scorer_cls = doc[0][0]["KeyNorm"]
    ids = ids_of(50)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
    cache = CompressedCache(model, "doc_keynorm:sinks=4", budget=20)
    cache.prefill(model, ids)
    for idx, layer in enumerate(cache.layers):
        keys, values = full.layers[idx].keys, full.layers[idx].values
        ctx = LayerContext(idx, len(cache.layers), keys, values, None, torch.ones(1, 50, dtype=torch.bool), 0.25)
        scores = scorer_cls(sinks=4).score(ctx)
        assert bool((scores[..., :4] == PROTECTED).all()) and not bool((scores[..., 4:] == PROTECTED).any())
        top = torch.topk(scores, 20, dim=-1).indices.sort(-1).values  # [B, H, 20], chronological
        assert bool((top[..., :4] == torch.arange(4)).all())  # the sinks are among them
        index = top[..., None].expand(-1, -1, -1, keys.shape[-1])
        assert torch.equal(layer.keys, torch.gather(keys, 2, index))
        assert torch.equal(layer.values, torch.gather(values, 2, index))
    assert cache.nbytes() < cache.full_nbytes()


def test_a_budget_below_the_sinks_is_refused(doc, model):
    cache = CompressedCache(model, "doc_keynorm:sinks=8", budget=4)
    with pytest.raises(kvsqueeze.KVSqueezeError, match="always keeps 8 tokens"):
        cache.prefill(model, ids_of(30))


def test_the_codec_stores_half_precision_in_half_the_bytes(doc, model):
    cache = CompressedCache(model, "doc_half")
    cache.prefill(model, ids_of(50))
    for layer in cache.layers:
        (block,) = layer.blocks
        assert type(block) is DenseBlock and layer.keys.shape[-2] == 0  # everything encoded, nothing in the tail
        assert block.keys.dtype == block.values.dtype == torch.float16 and block.keys.element_size() == 2
        B, H, _, D = layer.values.shape
        assert block.lengths.tolist() == [[50] * H]
        dense = 2 * B * H * 50 * D * torch.finfo(model.dtype).bits // 8  # keys + values at the model's float32
        assert block.nbytes() == dense // 2 + block.lengths.numel() * 8  # + the [B, H] lengths
    tokens = cache.tokens.numel() * cache.tokens.element_size()  # the ids prefill records are counted too
    assert cache.nbytes() == cache.full_nbytes() // 2 + tokens + sum(b.lengths.numel() * 8 for b in blocks_of(cache))


def blocks_of(cache: CompressedCache) -> list:
    return [block for layer in cache.layers if isinstance(layer, CompressedLayer) for block in layer.blocks]


def test_the_codec_decodes_close_to_the_full_cache_and_keeps_one_block(doc, model):
    ids, follow = ids_of(50), ids_of(40, seed=1)
    full, cache = DynamicCache(config=model.config), CompressedCache(model, "doc_half")
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
        cache.prefill(model, ids)
        for t in range(follow.shape[1]):
            step = follow[:, t : t + 1]
            want = model(step, past_key_values=full, use_cache=True).logits
            got = model(step, past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # float16 rounding of the stored tokens
    for layer in cache.layers:
        assert len(layer.blocks) == 1, "extend() merges every flushed group into the one block"
        assert layer.keys.shape[-2] < 16 and layer.blocks[0].tokens + layer.keys.shape[-2] * 2 == 2 * 90
        assert layer.blocks[0].keys.dtype == torch.float16
    assert cache.get_seq_length() == 90


def test_composed_with_the_scorer_through_generate_and_beam_search(doc, model):
    ids = ids_of(60)
    cache = CompressedCache(model, "doc_keynorm:sinks=4+doc_half:dtype=bfloat16", ratio=0.5)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 66)
    for layer in cache.layers:
        assert layer.blocks[0].keys.dtype == torch.bfloat16
        assert layer.kept_lengths().tolist() == [[30 + 5] * layer.keys.shape[1]]  # ceil(60 × 0.5) + 5 fed back
    assert cache.nbytes() < cache.full_nbytes() / 3
    beams = CompressedCache(model, "doc_half")
    with torch.no_grad():
        out = model.generate(ids, past_key_values=beams, num_beams=2, max_new_tokens=4, do_sample=False)
    assert out.shape[-1] == 64  # DenseBlock.select_rows reorders the half-precision rows


def test_a_ratio_for_the_codec_alone_is_refused(doc, model):
    with pytest.raises(kvsqueeze.KVSqueezeError, match="doc_half stores every token"):
        CompressedCache(model, "doc_half", ratio=0.5)


@pytest.mark.model
def test_the_blocks_run_as_written_on_the_embedded_model():
    before = dict(REGISTRY)
    with executed(tiny=False) as (after, printed):
        answer, held, *codecs = printed.strip().splitlines()
        assert answer.strip(), "the compressed cache answered nothing"
        assert "bytes held" in held and len(codecs) == 2
        assert after[1]["cache"].nbytes() < after[1]["cache"].full_nbytes() / 4
    assert before == REGISTRY  # the registry is back as it was
