"""The Jane Austen text ships inside the package: compressed, complete, and read without any download."""

from __future__ import annotations

import lzma

import pytest

from kvsqueeze import assets
from kvsqueeze.errors import KVSqueezeError


def test_the_six_novels_are_shipped_compressed():
    path = assets.files(assets.__name__) / assets.AUSTEN_ASSET
    raw = path.read_bytes()
    novels = assets.austen_novels()
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                              "sensesensibility"]  # fmt: skip
    text = sum(len(t.encode()) for t in novels.values())
    assert len(raw) < text / 3  # compressed (xz), not plain text
    assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in novels["prideprejudice"]
    assert "Emma Woodhouse, handsome, clever, and rich" in novels["emma"]


def test_a_corrupt_asset_is_one_line_error(monkeypatch, tmp_path):
    bad = tmp_path / assets.AUSTEN_ASSET
    bad.write_bytes(lzma.compress(b"not json")[:20])
    monkeypatch.setattr(assets, "files", lambda _name: tmp_path)
    assets.austen_novels.cache_clear()
    try:
        with pytest.raises(KVSqueezeError, match="corrupt; reinstall kvsqueeze"):
            assets.austen_novels()
        bad.unlink()
        with pytest.raises(KVSqueezeError, match="missing from the installed package"):
            assets.austen_novels()
    finally:
        assets.austen_novels.cache_clear()
