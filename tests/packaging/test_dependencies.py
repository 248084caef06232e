"""Dependency policy: the library alone imports no CLI/plot/data packages, extras exist and name what they add,
ranges not pins, one version, and the console script explains a missing extra in one line."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvsqueeze
from kvsqueeze import extras
from kvsqueeze.cli import app
from kvsqueeze.console import CLI_HINT

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# (scipy, accelerate, redis and hqq are left out: torch and transformers import them themselves when installed)
NOT_FOR_THE_LIBRARY = ("typer", "rich", "matplotlib", "rdata", "pandas", "xarray", "datasets", "ray", "jieba", "rouge",
                       "rouge_score", "rapidfuzz", "gguf")  # fmt: skip


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_import_kvsqueeze_imports_no_cli_plot_or_data_package():
    got = _run(
        "import json, sys, kvsqueeze\n"
        "c = kvsqueeze.CompressedCache\n"
        f"print(json.dumps(sorted(m for m in {NOT_FOR_THE_LIBRARY!r} if m in sys.modules)))"
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout.strip().splitlines()[-1]) == []


def test_library_dependencies_are_ranges_without_extras_packages():
    deps = PYPROJECT["project"]["dependencies"]
    assert not [d for d in deps if "==" in d], "the library pins nothing"
    names = {d.split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in deps}
    assert names.isdisjoint({"typer", "rich", "matplotlib", "rdata", "gguf", "accelerate", "pandas"})
    (tf,) = [d for d in deps if d.startswith("transformers")]
    assert ">=5." in tf and "<6" in tf
    (torch,) = [d for d in deps if d.startswith("torch")]
    assert ">=" in torch


def test_extras_exist_and_only_dev_tools_are_pinned():
    opt = PYPROJECT["project"]["optional-dependencies"]
    assert {"cli", "bench", "ray", "redis", "hf-quant", "embedded", "dev"} <= set(opt)
    assert any(d.startswith("typer") for d in opt["cli"]) and any(d.startswith("rich") for d in opt["cli"])
    assert {"matplotlib", "scipy", "datasets"} <= {d.split(">")[0].split("=")[0] for d in opt["bench"]}
    assert {"gguf", "accelerate"} <= {d.split(">")[0] for d in opt["embedded"]}
    for extra, reqs in opt.items():
        pinned = [r for r in reqs if "==" in r]
        assert extra == "dev" or not pinned, f"extra {extra!r} pins {pinned}"
    for module, extra in extras.PROVIDED_BY.items():
        assert extra in opt, f"{module} is said to come with missing extra {extra!r}"


def test_version_has_one_source():
    assert kvsqueeze.__version__ == importlib.metadata.version("kvsqueeze") == PYPROJECT["project"]["version"]
    literal = f'"{kvsqueeze.__version__}"'
    assert literal not in (ROOT / "src" / "kvsqueeze" / "__init__.py").read_text()  # read from the metadata
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"kvsqueeze {kvsqueeze.__version__}"


def test_console_script_is_the_guarded_entry_point():
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "kvsqueeze"]
    assert script.value == "kvsqueeze.console:main"


@pytest.mark.parametrize("absent", ["typer", "rich"])
def test_missing_cli_extra_is_one_line_not_a_traceback(absent):
    got = _run(f"import sys; sys.modules[{absent!r}] = None\nfrom kvsqueeze.console import main\nmain()")
    assert got.returncode == 2
    assert got.stderr.strip() == CLI_HINT and "Traceback" not in got.stderr


def test_python_dash_m_runs_the_cli():
    got = subprocess.run([sys.executable, "-m", "kvsqueeze", "--version"], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == f"kvsqueeze {kvsqueeze.__version__}"


def test_bench_without_the_bench_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(extras, "missing", lambda *mods: [m for m in mods if m == "matplotlib"])
    result = CliRunner().invoke(app, ["bench", "--task", "niah", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "needs matplotlib: pip install 'kvsqueeze[bench]'" in result.output
    assert "Traceback" not in result.output
