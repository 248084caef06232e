"""The tiny model the retrieval tests decode with (one per module)."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")
