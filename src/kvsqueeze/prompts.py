"""The one prompt builder: a context and a question as chat-formatted token ids, split where the context ends.

Used by :func:`kvsqueeze.pipeline.answer` and by every benchmark evaluator, so a method sees the same tokens in the
CLI, the Python API and the benchmark. The context part ends where the context text ends (it can be compressed
before the question is known); the question part ends with the answer prefix, so generation continues it.
"""

from __future__ import annotations

import torch

_SPLIT = "\x00KVSQUEEZE_CONTEXT_END\x00"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (any HF tokenizer, or anything with the same ``encode``)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def ids(tokenizer, text: str) -> torch.Tensor:
    """:func:`encode` as a ``[1, L]`` tensor."""
    return torch.tensor([encode(tokenizer, text)], dtype=torch.long)


def continuation_ids(tokenizer, before: str, after: str) -> list[int]:
    """Token ids of ``after`` as they follow ``before``'s tokens: ``encode(before + after)`` minus
    ``encode(before)`` when the latter is its prefix (the tokens a model writes after that prompt), otherwise
    ``encode(after)`` (a merge across the boundary, which a model continuing ``before``'s tokens cannot write)."""
    head = encode(tokenizer, before)
    whole = encode(tokenizer, before + after)
    if len(whole) > len(head) and whole[: len(head)] == head:
        return whole[len(head) :]
    return encode(tokenizer, after)


def chat(tokenizer, messages: list[dict]) -> str:
    """The conversation as the model's chat template writes it (with the generation prompt); plain text for a
    tokenizer without a template, where an earlier answer follows its ``Answer:`` as the next answer will (the text
    of a conversation only grows at its end)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lead = {"assistant": "Answer: "}
    return "".join(f"{lead.get(m['role'], '')}{m['content']}\n\n" for m in messages) + "Answer:"


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[str, str]:
    """The chat-formatted prompt as text, split where the context ends; the second part ends with
    ``answer_prefix``."""
    text = chat(tokenizer, [{"role": "user", "content": f"{context}{_SPLIT}\n\n{question}"}])
    head, tail = text.split(_SPLIT)
    if answer_prefix and not getattr(tokenizer, "chat_template", None):
        tail += " "
    return head, tail + answer_prefix


def prompt_ids(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_ids [1, Lc], question_ids [1, Lq])`` of :func:`split_prompt`."""
    head, tail = split_prompt(tokenizer, context, question, answer_prefix)
    return ids(tokenizer, head), ids(tokenizer, tail)


def segmented_prompt(
    tokenizer, documents: list[str], question: str, answer_prefix: str = ""
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A retrieval-augmented prompt in reusable pieces: ``(head [1, h], [document i [1, n_i]], tail [1, t])``.

    The user message is every document followed by a blank line, then the question; ``head`` is the chat template
    before it, ``tail`` the question, the template's end and ``answer_prefix``. Each piece is tokenized alone, so a
    document's token ids do not depend on its neighbours or its place (what makes its cache reusable); the whole
    prompt is the concatenation of the pieces (what a full recompute prefills too). Without a chat template the head
    is a one-line instruction, so that every prompt starts with a shared prefix."""
    text = chat(tokenizer, [{"role": "user", "content": f"{_SPLIT}{question}"}])
    head, tail = text.split(_SPLIT)
    if not head:
        head = "Answer the question after these documents.\n\n"
    if answer_prefix and not getattr(tokenizer, "chat_template", None):
        tail += " "
    pieces = [ids(tokenizer, document + "\n\n") for document in documents]
    return ids(tokenizer, head), pieces, ids(tokenizer, tail + answer_prefix)
