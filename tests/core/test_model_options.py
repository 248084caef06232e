"""``load_model(dtype="auto", device=…)`` and the CLI's ``--device``: the checkpoint's dtype, a device this machine
has, one-line refusals for the rest."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from kvsqueeze.cli import app
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import load_model, parse_device, parse_dtype
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model


def test_auto_dtype_is_the_checkpoints(tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="auto", device="auto", tokenizer=CharTokenizer())
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(tmp_path), dtype="float32", tokenizer=CharTokenizer())
    assert next(model.parameters()).dtype == torch.float32
    assert parse_dtype("auto", model.config) == torch.float32 and parse_dtype("auto") == torch.float32


def test_devices_this_machine_lacks_are_refused():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(KVSqueezeError, match="unknown device 'gpu7'"):
        parse_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(KVSqueezeError, match="not available on this machine"):
            parse_device("cuda")


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_the_meta_device_is_refused(device):
    with pytest.raises(KVSqueezeError, match="device 'meta' holds no data"):
        parse_device(device)


@pytest.mark.parametrize("device", ["xpu", "xpu:1", "hpu", "xla", "mtia", "privateuseone"])
def test_accelerators_this_machine_lacks_are_refused(device):
    if device.startswith("xpu") and hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(KVSqueezeError, match=f"device '{device}' is not available on this machine"):
        parse_device(device)


@pytest.mark.parametrize("command", [["generate", "--question", "q?", "--context", "text"], ["bench"]])
def test_cli_device_is_checked_before_any_model_work(command):
    result = CliRunner().invoke(app, [*command, "--device", "tpu-ish"])
    assert result.exit_code == 2 and "unknown device 'tpu-ish'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, [*command, "--device", "meta"])
    assert result.exit_code == 2 and "holds no data" in result.output
    assert len(result.output.strip().splitlines()) == 1
