"""Bad input a new user might give `generate`, `calibrate` or the loaders: one line naming the fix, exit 2, no
traceback, no silent result."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvsqueeze.cli import app
from kvsqueeze.errors import KVSqueezeError

runner = CliRunner()


def _generate(*args: str):
    return runner.invoke(app, ["generate", *args])


def _one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Ünïcödé café, naïve résumé.".encode("latin-1"), "is not UTF-8 (byte 0xdc at offset 0)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary (it holds NUL bytes)"),
    ],
)
def test_context_file_that_is_not_utf8_text_is_refused(tmp_path, content, message):
    path = tmp_path / "ctx.txt"
    path.write_bytes(content)
    _one_line(_generate("--question", "q?", "--method", "knorm", "--context-file", str(path)), message)


def test_context_file_that_is_a_directory(tmp_path):
    _one_line(_generate("--question", "q?", "--context-file", str(tmp_path)), "is a directory; give a text file")


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question(question):
    _one_line(_generate("--question", question, "--context", "Some text."), "the question is empty")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "none", "--ratio", "0.5"], "the full cache: the ratio 0.5 would never be applied"),
        (["--method", "kivi", "--budget", "10"], "kivi stores every token (a codec without a scorer)"),
        (["--method", "h2o+interval:ratio=0.5", "--budget", "10"], "sets its own ratio"),
    ],
)
def test_ratio_or_budget_that_would_never_be_applied(args, message):
    _one_line(_generate("--question", "q?", "--context", "Some text.", *args), message)


def test_directory_with_a_non_causal_model(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=8, d_ff=64, vocab_size=64).save_pretrained(tmp_path)
    result = _generate("--question", "q?", "--context", "Some text.", "--model", str(tmp_path))
    _one_line(result, "is a 't5' model, not a causal (decoder-only) language model")


def test_corrupt_gguf_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    pytest.importorskip("gguf")  # the embedded extra (the oldest-transformers run installs the library alone)
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\x01garbage" * 50)
    result = _generate("--question", "q?", "--context", "Some text.", "--model", str(bad))
    _one_line(result, f"cannot read {bad} as a GGUF causal LM")
    models = tmp_path / "cache" / "models"
    assert not any(models.glob("*.lock")) and not any(p.is_dir() for p in models.iterdir())


def test_offline_hub_id_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    _one_line(_generate("--question", "q?", "--context", "Some text.", "--model", "someorg/no-such-model"),
              "cannot load model 'someorg/no-such-model'")  # fmt: skip


def test_corrupt_heads_calibration_json(tmp_path):
    from kvsqueeze.calibration.heads import load_head_scores

    for content, message in [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a head calibration file"),
        (json.dumps({"echo": [[0.1, 0.2], [0.3]], "induction": [[0.1, 0.2], [0.3, 0.4]]}), "ragged"),
        (json.dumps({"echo": "x", "induction": [[0.1]]}), "is not a head calibration file"),
    ]:
        path = tmp_path / "heads.json"
        path.write_text(content)
        with pytest.raises(KVSqueezeError, match=message):
            load_head_scores(str(path))
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(KVSqueezeError, match="is not valid JSON"):
        load_head_scores(str(path))


def test_calibrate_heads_checks_its_output_and_model_before_any_work(tmp_path):
    afile = tmp_path / "taken"
    afile.write_text("x")
    result = runner.invoke(app, ["calibrate", "heads", "--out", str(afile / "heads.json")])
    _one_line(result, "cannot write the calibration to")
    result = runner.invoke(app, ["calibrate", "heads", "--out", str(tmp_path)])
    _one_line(result, "is a directory; give a .json file")
    result = runner.invoke(app, ["calibrate", "heads", "--model", str(tmp_path / "nothing-here"), "--out",
                                 str(tmp_path / "h.json")])  # fmt: skip
    _one_line(result, "model path not found")


@pytest.mark.parametrize("command", ["fast_kvzip", "kvzip-heads", "kvtuner", "kvquant"])
def test_calibrations_check_their_output_and_model_before_any_work(tmp_path, command):
    afile = tmp_path / "taken"
    afile.write_text("x")
    result = runner.invoke(app, ["calibrate", command, "--out", str(afile / "out")])
    _one_line(result, "cannot write the calibration to")
    result = runner.invoke(app, ["calibrate", command, "--model", str(tmp_path / "nothing-here")])
    _one_line(result, "model path not found")


@pytest.mark.model
def test_context_beyond_the_models_positions_is_refused_before_loading_it(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("The cat sat on the mat and looked at the hat. " * 40_000)  # ~1.9 MB, ~480k tokens
    _one_line(_generate("--question", "q?", "--method", "knorm", "--context-file", str(big)),
              "but the model allows at most 8192 positions")  # fmt: skip
    mid = tmp_path / "mid.txt"
    mid.write_text("The cat sat on the mat. " * 1400)  # ~8.4k tokens: measured whole
    _one_line(_generate("--question", "q?", "--method", "knorm", "--context-file", str(mid)),
              "the prompt plus --max-new-tokens needs")  # fmt: skip
