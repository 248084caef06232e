"""``Conversation``: one cache followed turn after turn; ``none`` replies as the whole history run at once, a
compressing method keeps the history bounded between turns."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import Conversation, KVSqueezeError
from kvsqueeze.conversation import pieces, question_ids, render
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model

TURNS = ("hello there, how are you", "tell me about ships", "and the stars?", "what did I ask first?")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").double()  # float64: the reply's argmax does not hinge on summation order


def test_turn_after_turn_equals_the_whole_history_at_once(model):
    tok = CharTokenizer()
    conv = Conversation(model, tok, "none", max_new_tokens=6)
    for text in TURNS:
        before = list(conv.ids)
        prompt = before + question_ids(tok, conv.messages, text)
        reply = conv.say(text)
        with torch.no_grad():  # transformers' own greedy generation over the whole history, no kvsqueeze cache
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)  # fmt: skip
        assert reply == tok.decode(out[0, len(prompt) :].tolist())
        assert conv.ids[: len(prompt)] == prompt
    assert conv.cache.get_seq_length() == len(conv.ids)  # the cache holds exactly the conversation's tokens
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * len(TURNS)


def test_a_compressing_method_keeps_the_history_bounded(model):
    tok = CharTokenizer()
    budget = 48
    conv = Conversation(model, tok, "snapkv:window=8", budget=budget, max_new_tokens=6)
    full = Conversation(model, tok, "none", max_new_tokens=6)
    per_token = None
    longest = 0
    for k in range(10):
        text = f"turn {k}: " + "the quick brown fox " * 2
        longest = max(longest, len(question_ids(tok, conv.messages, text)) + 6 + 1)
        conv.say(text)
        full.say(text)
        kept = [int(layer.kept_lengths().max()) for layer in conv.cache.layers]
        assert max(kept) <= budget + longest  # never more than the budget plus one turn per head
        per_token = full.nbytes() / len(full.ids)
        assert conv.nbytes() <= 1.1 * per_token * (budget + longest)
    assert len(conv.ids) > 5 * budget and full.nbytes() > 4 * conv.nbytes()


def test_codecs_follow_a_conversation_and_a_scorer_needs_a_budget(model):
    tok = CharTokenizer()
    conv = Conversation(model, tok, "kivi:bits=2,residual=8,group=8", max_new_tokens=4)
    full = Conversation(model, tok, "none", max_new_tokens=4)
    for text in TURNS:
        conv.say(text)
        full.say(text)
    assert conv.nbytes() < full.nbytes()
    retrieval = Conversation(model, tok, "shadowkv", budget=32, max_new_tokens=4)  # a retrieval tier: hot + cold
    for text in TURNS:
        retrieval.say(text)
    assert retrieval.cache.get_seq_length() == len(retrieval.ids)
    assert retrieval.cache.nbytes(tier="hot") < full.nbytes()
    with pytest.raises(KVSqueezeError, match="budget"):
        Conversation(model, tok, "snapkv")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "snapkv", "budget": 0}, "budget must be >= 1 token per KV head, got 0"),
        ({"method": "snapkv", "budget": -4}, "budget must be >= 1 token per KV head, got -4"),
        ({"method": "none", "max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1, got 0"),
        ({"method": "none", "max_new_tokens": 2.5}, "max_new_tokens must be a whole number >= 1, got 2.5"),
    ],
)
def test_a_budget_or_reply_length_below_one_is_refused(model, kwargs, message):
    with pytest.raises(KVSqueezeError, match=message):
        Conversation(model, CharTokenizer(), **kwargs)


@pytest.mark.parametrize(("text", "max_new_tokens"), [("", None), ("  \n", None), (None, None), ("hi", 0)])
def test_an_empty_turn_or_a_zero_reply_length_is_refused(model, text, max_new_tokens):
    conv = Conversation(model, CharTokenizer(), "none", max_new_tokens=4)
    with pytest.raises(KVSqueezeError, match=r"non-empty user turn|max_new_tokens must be"):
        conv.say(text, max_new_tokens=max_new_tokens)
    assert conv.messages == [] and conv.ids == []  # nothing was fed


def test_render_uses_the_chat_template_when_there_is_one():
    class Templated(CharTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
            return text + ("<assistant>" if add_generation_prompt else "")

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert pieces(Templated(), messages) == ["<user>hi</>", "<assistant>yo</>"]
    assert pieces(CharTokenizer(), messages) == ["User: hi\n", "Assistant: yo\n"]
    ids = [t for piece in render(Templated(), messages) for t in piece]
    assert ids == Templated().encode("<user>hi</><assistant>yo</>")
    assert question_ids(Templated(), messages, "q?") == Templated().encode("<user>q?</><assistant>")
    with pytest.raises(KVSqueezeError, match="messages"):
        pieces(CharTokenizer(), [{"role": "robot", "content": "x"}])


@pytest.mark.parametrize(
    "method,budget", [("none", None), ("snapkv:window=8", 48), ("kivi:bits=2,residual=8,group=8", None)]
)
def test_a_stored_conversation_resumes_elsewhere_as_if_it_had_never_stopped(model, tmp_path, method, budget):
    from kvsqueeze.store import open as open_store

    tok = CharTokenizer()
    alone = Conversation(model, tok, method, budget=budget, max_new_tokens=6)
    replies = [alone.say(text) for text in TURNS]
    first = Conversation(model, tok, method, budget=budget, max_new_tokens=6, store=open_store(tmp_path), name="ana")
    assert not first.resumed
    assert [first.say(text) for text in TURNS[:2]] == replies[:2]
    store = open_store(tmp_path)  # another process: a fresh store object over the same directory
    second = Conversation(model, tok, method, budget=budget, max_new_tokens=6, store=store, name="ana")
    assert second.resumed and second.ids == first.ids and second.messages == first.messages
    assert [second.say(text) for text in TURNS[2:]] == replies[2:]
    assert second.ids == alone.ids
    for mine, ref in zip(second.cache.layers, alone.cache.layers, strict=True):  # the same computation: exact
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)
    assert len(store) == 2  # the latest turn's cache and the record: earlier turns' caches are dropped
    other = Conversation(model, tok, method, budget=budget, store=store, name="bo")
    assert not other.resumed and other.ids == []


def test_a_dropped_cache_is_rebuilt_and_bad_stored_conversations_are_one_line(model, tmp_path):
    from kvsqueeze.store import open as open_store

    tok = CharTokenizer()
    store = open_store(tmp_path)
    conv = Conversation(model, tok, "none", max_new_tokens=4, store=store, name="ana")
    conv.say(TURNS[0])
    store.backend.delete(conv.cache_key)  # evicted by max_bytes or a ttl
    again = Conversation(model, tok, "none", max_new_tokens=4, store=store, name="ana")
    assert again.resumed and again.cache.get_seq_length() == len(conv.ids)
    uninterrupted = Conversation(model, tok, "none", max_new_tokens=4)
    uninterrupted.say(TURNS[0])
    assert again.say(TURNS[1]) == uninterrupted.say(TURNS[1])  # float64: a prefill and turn-by-turn agree
    with pytest.raises(KVSqueezeError, match="both store"):
        Conversation(model, tok, "none", store=store)
    store.backend.put(again.record_key(), b"{not json")
    with pytest.raises(KVSqueezeError, match="corrupt"):
        Conversation(model, tok, "none", store=store, name="ana")
