"""Fixtures of the harness tests: a character tokenizer (ids < 128) that fits the tiny random Llama."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from kvsqueeze.models import check_context_fits
from tests.conftest import TINY, tiny_model


class CharTokenizer:
    """One token per character (non-ASCII → '?'); no chat template. Enough for the generators and the runner."""

    chat_template = None
    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) if 3 <= ord(c) < 128 else ord("?") for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids if not (skip_special_tokens and int(i) < 3))


class TinyProvider:
    """A model provider for tests that counts model loads (its model allows 1024 positions, as ``TINY`` says)."""

    def __init__(self, fail_on_load: bool = False):
        self.tokenizer = CharTokenizer()
        self.model_loads = 0
        self._fail = fail_on_load
        self._model = None

    @property
    def config(self):
        return LlamaConfig(**TINY)

    def check_fits(self, tokens: int, what: str, fix: str) -> None:
        check_context_fits(self.config, tokens, "float32", what=what, fix=fix)

    @property
    def model(self):
        if self._fail:
            raise AssertionError("the model was requested: a finished run must do no model work")
        if self._model is None:
            self.model_loads += 1
            self._model = tiny_model("llama")
        return self._model


@pytest.fixture
def chars():
    return CharTokenizer()
