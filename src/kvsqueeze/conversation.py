"""Conversations as a first-class input: turns with roles rendered into token ids, and a cache that follows them.

- :func:`render` gives each message's token ids as it sits in the conversation: the chat template's text when the
  tokenizer has one (message ``k``'s piece is the template of the first ``k + 1`` messages minus that of the first
  ``k``), plain ``User: …`` / ``Assistant: …`` lines otherwise. Each piece is tokenized alone, so a conversation's
  ids are the concatenation of its turns' ids and grow by appending (what a cache that follows it needs).
- :class:`Conversation` keeps one :class:`~kvsqueeze.core.cache.CompressedCache` across turns:
  ``conv.say(text)`` appends the user turn, generates the reply greedily from the cache and keeps both in it. A
  scorer with the default prefill schedule is run under the ``blockwise`` schedule with the given ``budget``, so
  the history is recompressed to the budget whenever a turn brings more than it holds (the cache stays bounded
  across turns, scored by the newest turn's queries); codecs compress what each turn adds; ``none`` is the exact
  full cache.
- With ``store=`` and ``name=`` a conversation outlives its process: after every turn its cache and a record (the
  messages, the token ids the cache holds, the method) are put in the store (:mod:`kvsqueeze.store`: a directory,
  Redis for many machines), and ``Conversation(…, store=, name=)`` elsewhere resumes it where it stopped. A cache
  the store has dropped (``max_bytes``, ``ttl``) is rebuilt by prefilling the recorded token ids.
"""

from __future__ import annotations

import hashlib
import json

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import encode
from kvsqueeze.spec import parse_method
from kvsqueeze.store import Store, namespace
from kvsqueeze.validation import check_budget, check_count

ROLES = ("system", "user", "assistant")
PLAIN = {"system": "System", "user": "User", "assistant": "Assistant"}


def check_messages(messages: list[dict]) -> None:
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise KVSqueezeError(
                "a conversation is a list of {'role': 'user'|'assistant'|'system', 'content': str} messages"
            )


def templated(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def pieces(tokenizer, messages: list[dict]) -> list[str]:
    """The text of each message as it sits in the rendered conversation (template or plain lines)."""
    check_messages(messages)
    if not templated(tokenizer):
        return [f"{PLAIN[m['role']]}: {m['content']}\n" for m in messages]
    out, before = [], ""
    for k in range(len(messages)):
        text = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not text.startswith(before):
            raise KVSqueezeError(
                "this chat template rewrites earlier turns when one is added; give the conversation as plain text"
            )
        out.append(text[len(before) :])
        before = text
    return out


def generation_prompt(tokenizer, messages: list[dict]) -> str:
    """What the template adds after ``messages`` to open the assistant's reply (``Assistant:`` without one)."""
    if not templated(tokenizer):
        return "Assistant:"
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages, tokenize=False)
    return with_prompt[len(without) :] if with_prompt.startswith(without) else ""


def render(tokenizer, messages: list[dict]) -> list[list[int]]:
    """Token ids of each message's piece (:func:`pieces`), each tokenized alone."""
    return [encode(tokenizer, text) for text in pieces(tokenizer, messages)]


def question_text(tokenizer, history: list[dict], question: str, answer_prefix: str = "") -> str:
    """The text that follows ``history`` to ask ``question``: the user turn, the reply opening, ``answer_prefix``."""
    messages = [*history, {"role": "user", "content": question}]
    if templated(tokenizer) and history:
        before = tokenizer.apply_chat_template(history, tokenize=False)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(before):
            raise KVSqueezeError(
                "this chat template rewrites earlier turns when one is added; give the conversation as plain text"
            )
        turn = whole[len(before) :]
    else:
        turn = pieces(tokenizer, messages)[-1]
    opening = generation_prompt(tokenizer, messages)
    sep = " " if answer_prefix and not templated(tokenizer) else ""
    return turn + opening + sep + answer_prefix


def question_ids(tokenizer, history: list[dict], question: str, answer_prefix: str = "") -> list[int]:
    """Token ids of :func:`question_text` (tokenized alone: they append to the history's ids)."""
    return encode(tokenizer, question_text(tokenizer, history, question, answer_prefix))


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    return ids


def greedy(model, cache, new_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Feed ``new_ids`` after what ``cache`` holds, then decode greedily (each generated token fed back, the last one
    included, so the cache holds the whole exchange). Returns the generated ids (an end token included)."""
    device = next(model.parameters()).device
    out: list[int] = []
    step = torch.tensor([new_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=step, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits
            token = int(logits[0, -1].argmax())  # one host read per generated token (the reply is text)
            out.append(token)
            step = torch.tensor([[token]], dtype=torch.long, device=device)
            if token in eos:
                break
        model(input_ids=step, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    return out


def conversation_method(method: str, budget: int | None):
    """The method a conversation runs: a scorer with the prefill schedule moves to ``blockwise`` at ``budget``."""
    parsed = parse_method(method) if isinstance(method, str) else method
    if parsed.evicts and parsed.schedule.name == "prefill":
        if budget is None:
            raise KVSqueezeError(
                f"{parsed.spec()} in a conversation needs a token budget to keep the history bounded: pass budget=…"
            )
        return parse_method(f"{parsed.spec()}+blockwise:budget={budget}")
    return parsed


class Conversation:
    """A conversation that one cache follows turn after turn: ``conv.say(user_text) -> reply``.

    ``method`` is any spec; a scorer needs ``budget`` (tokens per KV head the history is kept to). ``messages``
    holds the turns so far (with ``system`` first when given); ``ids`` the token ids the cache holds."""

    def __init__(self, model, tokenizer, method: str = "none", budget: int | None = None, ratio: float | None = None,
                 system: str | None = None, max_new_tokens: int = 64, store: Store | None = None,
                 name: str | None = None):  # fmt: skip
        budget = check_budget(budget)
        self.max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
        self.model, self.tokenizer = model, tokenizer
        parsed = conversation_method(method, budget)
        is_decoding = parsed.schedule.name != "prefill"
        self.cache = CompressedCache(model, parsed, ratio=ratio, budget=None if is_decoding else budget,
                                     tokenizer=tokenizer)  # fmt: skip
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.ids: list[int] = []
        self.eos = eos_ids(model, tokenizer)
        if (store is None) != (name is None):
            raise KVSqueezeError("a stored conversation needs both store=… and name=… (the name it is kept under)")
        self.store, self.name, self.cache_key = store, name, None
        self.resumed = False
        if store is not None:
            self.resume()

    def record_key(self) -> str:
        """Where the store keeps this conversation's record (its messages, token ids, method, cache key)."""
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:32]
        return f"conversation-{namespace(self.model, self.cache.method)}-{digest}"

    def resume(self) -> None:
        """Continue the stored conversation of this name, if the store holds one for this model and method."""
        blob = self.store.backend.get(self.record_key())
        if blob is None:
            return
        try:
            record = json.loads(blob)
            messages, ids, key = record["messages"], [int(t) for t in record["ids"]], record["cache"]
            check_messages(messages)
        except (ValueError, KeyError, TypeError) as err:
            raise KVSqueezeError(
                f"the stored record of conversation {self.name!r} is corrupt ({err}): delete it from the store"
            ) from err
        cache = self.store.load(key, self.model, self.tokenizer)
        if cache is None:  # dropped by the store: rebuilt from the recorded tokens
            cache = self.cache
            if ids:
                cache.prefill(self.model, torch.tensor([ids]))
        self.cache, self.messages, self.ids, self.cache_key, self.resumed = cache, messages, ids, key, True

    def keep(self) -> None:
        """Put this turn's cache and the conversation's record in the store (the previous turn's cache is dropped)."""
        key = self.store.save(self.cache, self.model, torch.tensor([self.ids]))
        record = {"messages": self.messages, "ids": self.ids, "cache": key, "method": self.cache.method.spec()}
        self.store.backend.put(self.record_key(), json.dumps(record).encode())
        if self.cache_key is not None and self.cache_key != key:
            self.store.backend.delete(self.cache_key)
        self.cache_key = key

    def say(self, text: str, max_new_tokens: int | None = None) -> str:
        """Append a user turn, generate the reply greedily from the cache, keep both; returns the reply's text."""
        if not isinstance(text, str) or not text.strip():
            raise KVSqueezeError(f"say() needs a non-empty user turn, got {text!r}")
        limit = self.max_new_tokens if max_new_tokens is None else check_count(max_new_tokens, "max_new_tokens")
        new = question_ids(self.tokenizer, self.messages, text)
        if not self.ids and self.messages:  # a system turn not fed yet
            new = encode(self.tokenizer, pieces(self.tokenizer, self.messages)[0]) + new
        out = greedy(self.model, self.cache, new, limit, self.eos)
        reply = self.tokenizer.decode([t for t in out if t not in self.eos], skip_special_tokens=True)
        self.ids += new + out
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        if self.store is not None:
            self.keep()
        return reply

    def nbytes(self) -> int:
        return self.cache.nbytes()
