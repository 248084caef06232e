"""Re-run issue 12's bad-input matrix as a new user would: every case through the real `kvsqueeze` CLI.

Each case runs in a subprocess and is classified:

- ``clean``     exit code 2, one line on stderr naming the problem, no traceback (or, for the result checks, the
                sweep/report behaved: no duplicate rows, valid JSONL, …);
- ``traceback`` a Python traceback reached the user;
- ``hang``      no answer within the case's time limit;
- ``silent``    it "worked" although the input was wrong (exit 0, or a wrong result).

Usage (``--src`` runs another checkout's sources, e.g. an extracted older commit, with this virtualenv)::

    .venv/bin/python scripts/bad_input_matrix.py [--src /path/to/other/src] [--skip-slow] [--markdown]

Cases marked slow load the embedded model (a few tiny sweeps, ~1–2 min in all).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Outcome:
    code: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr or "Traceback" in self.stdout

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.strip().splitlines() if line.strip()]


@dataclass
class Case:
    name: str
    argv: list[str]
    check: Callable[[Outcome, Path], str | None] | None = None  # returns a verdict, None = the one-line rule
    setup: Callable[[Path], None] | None = None
    env: dict = field(default_factory=dict)
    timeout: float = 120
    slow: bool = False


def one_line(out: Outcome) -> str:
    if out.code is None:
        return "hang"
    if out.traceback:
        return "traceback"
    if out.code == 0:
        return "silent"
    return "clean" if out.code == 2 and len(out.lines) == 1 else f"messy (exit {out.code}, {len(out.lines)} lines)"


def run(cmd: list[str], env: dict, timeout: float, cwd: Path) -> Outcome:
    start = time.perf_counter()
    try:
        got = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout, cwd=cwd)
        return Outcome(got.returncode, got.stdout, got.stderr, time.perf_counter() - start)
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Outcome(None, stdout, stderr, time.perf_counter() - start)


def rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(None)
    return out


# ---- fixtures ----------------------------------------------------------------------------------------------------
def make_files(root: Path) -> None:
    (root / "latin1.txt").write_bytes("Ünïcödé café, naïve résumé. ".encode("latin-1") * 20)
    (root / "binary.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (root / "huge.txt").write_text("The cat sat on the mat and looked at the hat. " * 450_000)  # ~20 MB
    (root / "afile").write_text("not a directory")
    (root / "corrupt.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4000))
    (root / "ctx.txt").write_text("Alice keeps her spare key under the blue flower pot next to the door. " * 10)
    t5 = root / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(
        json.dumps(
            {
                "model_type": "t5",
                "architectures": ["T5ForConditionalGeneration"],
                "d_model": 32,
                "num_layers": 1,
                "num_heads": 2,
                "d_kv": 8,
                "d_ff": 64,
                "vocab_size": 64,
            }
        )
    )
    (root / "heads_corrupt.json").write_text('{"echo": [[0.1, 0.2], [0.3')
    ctx = "The quick brown fox jumps over the lazy dog. " * 30
    lines = [
        {
            "context": ctx + f" The code word is {w}.",
            "question": "What is the code word?",
            "answer": w,
            "max_new_tokens": 6,
        }
        for w in ("apple", "river")
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "latin1.jsonl").write_bytes(
        (json.dumps({"context": "x", "question": "q", "answer": "a"})[:-1] + ', "note": "café"}\n').encode("latin-1")
    )
    report = root / "reports"
    for name, content in {
        "empty": b"",
        "array": b"[1, 2, 3]\n",
        "no_method": b'{"task": "niah", "sample_id": "s0", "status": "ok", "scores": {"score": 1.0}}\n',
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary\n",
    }.items():
        (report / name).mkdir(parents=True)
        (report / name / "results.jsonl").write_bytes(content)


TINY = ["--samples", "1", "--context-length", "512", "--ratios", "0.5", "--no-progress"]
FILE_SWEEP = ["--methods", "knorm", "--ratios", "0.5", "--no-progress"]


def check_concurrent(out: Outcome, root: Path) -> str:
    """Two sweeps started together on one --out: no row may be written twice."""
    got = [r for r in rows(root / "both" / "results.jsonl") if r]
    keys = [r.get("key") for r in got]
    if len(keys) != len(set(keys)):
        return f"silent ({len(keys) - len(set(keys))} rows written twice)"
    return "clean" if "in use by another sweep" in out.stderr or out.code == 0 else one_line(out)


def concurrent_sweeps(python: list[str], env: dict, root: Path) -> Outcome:
    cmd = [*python, "bench", "--task", "niah", "--methods", "knorm", *TINY, "--out", str(root / "both")]
    first = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    second = run(cmd, env, 600, root)
    first.communicate(timeout=600)
    return second


def resume_after_edit(python: list[str], env: dict, root: Path) -> Outcome:
    cmd = [*python, "bench", "--task", f"file:{root / 'data.jsonl'}", *FILE_SWEEP, "--out", str(root / "edit")]
    run(cmd, env, 600, root)
    data = root / "data.jsonl"
    data.write_text(data.read_text().replace("river", "stone"))
    return run(cmd, env, 600, root)


def check_resume_after_edit(out: Outcome, root: Path) -> str:
    got = [r for r in rows(root / "edit" / "results.jsonl") if r]
    fresh = [r for r in got if r.get("expected") == ["stone"]]
    return "clean" if fresh else f"silent (the edited line was not rerun; {len(got)} rows)"


def torn_line(python: list[str], env: dict, root: Path) -> Outcome:
    cmd = [*python, "bench", "--task", f"file:{root / 'data.jsonl'}", *FILE_SWEEP, "--out", str(root / "torn")]
    run(cmd, env, 600, root)
    with (root / "torn" / "results.jsonl").open("a") as fh:
        fh.write('{"key": "torn, half a row')
    return run(cmd, env, 600, root)


def check_torn(out: Outcome, root: Path) -> str:
    bad = [r for r in rows(root / "torn" / "results.jsonl") if not isinstance(r, dict)]
    return "clean" if not bad and out.code == 0 else f"silent ({len(bad)} invalid lines left in results.jsonl)"


def report_duplicates(python: list[str], env: dict, root: Path) -> Outcome:
    src = root / "edit" / "results.jsonl"
    dup = root / "dup"
    dup.mkdir(exist_ok=True)
    if src.is_file():
        good = [line for line in src.read_text().splitlines() if line.strip()]
        (dup / "results.jsonl").write_text("\n".join(good * 2) + "\n")
    return run([*python, "report", str(dup)], env, 300, root)


def check_duplicates(out: Outcome, root: Path) -> str:
    csv = root / "dup" / "summary.csv"
    if not csv.is_file():
        return one_line(out)
    header, *body = csv.read_text().splitlines()
    n_col = header.split(",").index("n")
    samples = {int(line.split(",")[n_col]) for line in body if ",score," in line}
    return "clean" if samples and max(samples) <= 2 else f"silent (n = {sorted(samples)} from 2 samples)"


def check_stale_lock(out: Outcome, root: Path) -> str:
    verdict = one_line(out)
    locks = list((root / "cache" / "models").glob("*.lock")) if (root / "cache" / "models").is_dir() else []
    return verdict if not locks else f"{verdict} + stale lock file {locks[0].name}"


def check_offline(out: Outcome, root: Path) -> str:
    retries = sum("Retry" in line or "Retrying" in line for line in out.stderr.splitlines())
    return one_line(out) if not retries else f"messy ({retries} retry warnings before the error)"


def cases(root: Path) -> list[Case]:
    ctx = ["--question", "Where is the key?", "--method", "knorm"]
    out = ["--out", str(root / "run")]
    gen = ["generate", *ctx]
    return [
        Case("generate --context-file DIR", [*gen, "--context-file", str(root)]),
        Case("generate --context-file latin1.txt", [*gen, "--context-file", str(root / "latin1.txt")]),
        Case("generate --context-file binary.png", [*gen, "--context-file", str(root / "binary.png")]),
        Case("generate --question ''", ["generate", "--question", "", "--context", "Some text."]),
        Case(
            "generate --method none --ratio 0.5",
            ["generate", "--question", "q?", "--context", "Some text.", "--method", "none", "--ratio", "0.5"],
        ),
        Case(
            "generate --method kivi --budget 10",
            ["generate", "--question", "q?", "--context", "Some text.", "--method", "kivi", "--budget", "10"],
        ),
        Case("generate --model DIR (T5)", [*gen, "--context", "Some text.", "--model", str(root / "t5")]),
        Case(
            "generate --model corrupt.gguf",
            [*gen, "--context", "Some text.", "--model", str(root / "corrupt.gguf")],
            check=check_stale_lock,
        ),
        Case("generate --context-file 20MB", [*gen, "--context-file", str(root / "huge.txt")], timeout=300),
        Case(
            "generate --model offline Hub id",
            [*gen, "--context", "Some text.", "--model", "someorg/no-such-model"],
            check=check_offline,
        ),
        Case(
            "generate heads calibration JSON corrupt",
            [
                *gen[:-2],
                "--method",
                f"razorattention:heads={root / 'heads_corrupt.json'}",
                "--context-file",
                str(root / "ctx.txt"),
                "--ratio",
                "0.5",
                "--max-new-tokens",
                "2",
            ],
            slow=True,
        ),
        Case("bench --out an existing file", ["bench", "--methods", "knorm", "--out", str(root / "afile")]),
        Case("bench --out under a file", ["bench", "--methods", "knorm", "--out", str(root / "afile" / "x")]),
        Case("bench --task file:latin1.jsonl", ["bench", "--task", f"file:{root / 'latin1.jsonl'}", *out]),
        Case("bench --task file:DIR", ["bench", "--task", f"file:{root}", *out]),
        Case("bench --model DIR (T5)", ["bench", "--model", str(root / "t5"), *out]),
        Case("bench --context-length 100000", ["bench", "--context-length", "100000", *out], timeout=90),
        Case("bench --model offline Hub id", ["bench", "--model", "someorg/no-such-model", *out], check=check_offline),
        Case("report: empty results.jsonl", ["report", str(root / "reports" / "empty")]),
        Case("report: a JSON array line", ["report", str(root / "reports" / "array")]),
        Case("report: a row without method", ["report", str(root / "reports" / "no_method")]),
        Case("report: binary content", ["report", str(root / "reports" / "binary")]),
        Case(
            "calibrate heads --model DIR (T5)",
            ["calibrate", "heads", "--model", str(root / "t5"), "--out", str(root / "h.json")],
        ),
        Case(
            "calibrate kvtuner --model DIR (T5)",
            ["calibrate", "kvtuner", "--model", str(root / "t5"), "--out", str(root / "kvtuner.json")],
        ),
        Case(
            "calibrate kvquant --model DIR (T5)",
            ["calibrate", "kvquant", "--model", str(root / "t5"), "--out", str(root / "kvquant.json")],
        ),
        Case("calibrate heads --out DIR", ["calibrate", "heads", "--out", str(root)]),
        Case(
            "calibrate heads --model corrupt.gguf",
            ["calibrate", "heads", "--model", str(root / "corrupt.gguf"), "--out", str(root / "h.json")],
            check=check_stale_lock,
        ),
        Case("two sweeps on one --out at once", ["<concurrent>"], check=check_concurrent, slow=True, timeout=600),
        Case(
            "resume after editing a file: dataset",
            ["<resume_after_edit>"],
            check=check_resume_after_edit,
            slow=True,
            timeout=600,
        ),
        Case("torn last line, then resume", ["<torn_line>"], check=check_torn, slow=True, timeout=600),
        Case("report of duplicated rows", ["<report_duplicates>"], check=check_duplicates, slow=True),
    ]


SPECIAL = {
    "<concurrent>": concurrent_sweeps,
    "<resume_after_edit>": resume_after_edit,
    "<torn_line>": torn_line,
    "<report_duplicates>": report_duplicates,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="run the sources of another checkout (its src/ folder)")
    parser.add_argument("--skip-slow", action="store_true", help="skip the cases that run sweeps on the model")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvsqueeze-bad-inputs-"))
    make_files(root)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["KVSQUEEZE_CACHE"] = os.environ.get("KVSQUEEZE_CACHE") or str(Path.home() / ".cache" / "kvsqueeze")
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    python = [sys.executable, "-c", "from kvsqueeze.cli import app; app()"]
    results = []
    for case in cases(root):
        if case.slow and args.skip_slow:
            continue
        case_env = {**env, **case.env}
        if "gguf" in case.name:  # a private cache: the conversion lock file is checked afterwards
            case_env["KVSQUEEZE_CACHE"] = str(root / "cache")
        if case.argv[0] in SPECIAL:
            outcome = SPECIAL[case.argv[0]](python, case_env, root)
        else:
            outcome = run([*python, *case.argv], case_env, case.timeout, root)
        verdict = case.check(outcome, root) if case.check else one_line(outcome)
        first = (outcome.lines or ["(no stderr)"])[-1 if outcome.traceback else 0][:150]
        results.append((case.name, verdict, outcome.seconds, first))
        if not args.markdown:
            print(f"{verdict:>10}  {outcome.seconds:6.1f}s  {case.name}: {first}", flush=True)
    if args.markdown:
        print("| case | verdict | seconds | what the user sees (first line, or a traceback's last) |")
        print("|---|---|---|---|")
        for name, verdict, seconds, first in results:
            print(f"| {name} | {verdict} | {seconds:.1f} | {first.replace('|', '/')} |")
    counts: dict[str, int] = {}
    for _, verdict, _, _ in results:
        counts[verdict.split(" ")[0]] = counts.get(verdict.split(" ")[0], 0) + 1
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
