"""README's methods table is generated from the registry and must stay in sync with it."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from kvsqueeze.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_methods_table_matches_registry():
    generated = CliRunner().invoke(app, ["methods", "--markdown"]).output.strip()
    block = re.search(r"<!-- methods:start -->\n(.*?)\n<!-- methods:end -->", README.read_text(), re.S)
    assert block, "README lacks the <!-- methods:start/end --> block"
    assert block.group(1).strip() == generated, "README methods table is stale: paste `kvsqueeze methods --markdown`"
