"""README's examples are executed: every ``python`` block as written, every ``bash`` block command by command.

- ``kvsqueeze …`` lines run the installed console script in a temporary folder holding ``essay.txt`` (a README
  placeholder for "any text file"), with ``$KVSQUEEZE_CACHE`` pointing at a fresh folder that links the converted
  embedded model (so calibrations really run, never read an earlier result). They use the real embedded model; only
  sweep sizes are cut for time (``bench``: 1 sample, the first ratio and two methods, 512-token contexts;
  ``calibrate kvtuner|kvquant``: 64 calibration tokens). A Hub model id with no network must end in the one-line
  "cannot load model" error (exit 2).
  The same holds for a Hub dataset id given to ``--task``.
- ``make TARGET`` lines are checked with ``make -n`` (running them would run this suite or reinstall).
- ``pip install …`` lines are checked against the package's metadata (the extras they name exist); the package is
  installed already, and the registry is not this test's to reach.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SCRIPT = Path(sys.executable).with_name("kvsqueeze")


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text(encoding="utf-8")) if kind == lang]


def commands(body: str) -> list[list[str]]:
    """Shell lines of a block (continuations joined, comments dropped) as argument lists."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def fast(argv: list[str]) -> list[str]:
    """The same command with a sweep or calibration cut down to test size (the model stays the real one)."""
    argv = list(argv)
    if argv[1:2] == ["bench"]:
        opts = {"--samples": "1", "--context-length": "512"}
        for i, arg in enumerate(argv[:-1]):
            if arg in opts:
                argv[i + 1] = opts[arg]
            elif arg == "--ratios":
                argv[i + 1] = argv[i + 1].split(",")[0]
            elif arg == "--methods":
                argv[i + 1] = ",".join(argv[i + 1].split(",")[:2])
        task = argv[argv.index("--task") + 1] if "--task" in argv else "niah"
        dataset = task.split(":")[0] in ("longbench", "infinitebench", "ruler")
        argv += [] if "--samples" in argv else ["--samples", "1"]
        argv += [] if "--context-length" in argv or dataset else ["--context-length", "512"]
        argv += ["--threads", "1", "--no-progress"]
    if argv[1:3] in (["calibrate", "kvtuner"], ["calibrate", "kvquant"]):
        argv += ["--tokens", "64"]
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from kvsqueeze.data import essays
    from kvsqueeze.models import cache_dir

    work = tmp_path_factory.mktemp("readme")
    (work / "essay.txt").write_text(essays()[0], encoding="utf-8")
    shutil.copytree(ROOT / "tests" / "bench" / "fixtures", work / "tests" / "bench" / "fixtures")
    cache = work / "cache"
    (cache / "models").mkdir(parents=True)
    for model in (cache_dir() / "models").iterdir():
        if model.is_dir():
            (cache / "models" / model.name).symlink_to(model)
    return work


def run_line(argv: list[str], workdir: Path) -> None:
    env = {**os.environ, "KVSQUEEZE_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1"}
    line = shlex.join(argv)
    if argv[0] == "pip":
        extras = set(importlib.metadata.metadata("kvsqueeze").get_all("Provides-Extra") or [])
        for spec in argv[2:]:
            name, _, named = spec.partition("[")
            assert name == "kvsqueeze", line
            assert set(filter(None, named.rstrip("]").split(","))) <= extras, f"{line}: unknown extra"
        return
    if argv[0] == "make":
        got = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, f"{line}: {got.stderr}"
        return
    assert argv[0] == "kvsqueeze", f"README command not covered by this test: {line}"
    got = subprocess.run([str(SCRIPT), *fast(argv)[1:]], cwd=workdir, env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    hub_model = "--model" in argv and argv[argv.index("--model") + 1].count("/") == 1
    task = argv[argv.index("--task") + 1] if "--task" in argv else ""
    hub_data = (
        task.split(":")[0] in ("longbench", "infinitebench", "ruler")
        and not Path(workdir, task.split(":", 1)[1]).exists()
    )
    if (hub_model or hub_data) and got.returncode:  # no network here: the one-line error is the expected outcome
        assert got.returncode == 2 and "cannot load" in got.stderr, f"{line}: {got.stderr[-2000:]}"
        assert "Traceback" not in got.stderr
        return
    assert got.returncode == 0, f"{line} failed:\n{got.stdout[-2000:]}\n{got.stderr[-3000:]}"
    if argv[1:3] == ["generate", "--method"] or "--json" in argv:
        assert got.stdout.strip(), f"{line}: no answer printed"
    if argv[1] == "calibrate":  # a progress bar with an ETA, then the path written
        assert "ETA" in got.stderr and Path(workdir, got.stdout.strip().splitlines()[-1]).is_file(), line
    if argv[1] == "demo":
        for column in ("mode", "method", "answer", "correct", "cache MB", "× smaller", "tok/s", "full cache"):
            assert column in got.stdout, f"demo table lacks {column!r}"
        assert "kvsqueeze bench" in got.stdout.strip().splitlines()[-1]


def test_readme_has_the_examples_this_test_runs():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 4
    lines = [argv for body in blocks("bash") for argv in commands(body)]
    assert {argv[0] for argv in lines} <= {"pip", "make", "kvsqueeze"}
    assert any(argv[1:3] == ["calibrate", "kvquant"] for argv in lines if argv[0] == "kvsqueeze")


def test_pip_and_make_lines(workdir):
    for body in blocks("bash"):
        for argv in commands(body):
            if argv[0] in ("pip", "make"):
                run_line(argv, workdir)


@pytest.mark.model
@pytest.mark.parametrize("index", range(len(blocks("bash"))))
def test_bash_block_runs(index, workdir):
    for argv in commands(blocks("bash")[index]):
        if argv[0] == "kvsqueeze":
            run_line(argv, workdir)


@pytest.mark.model
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written(index, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "the example printed nothing"
