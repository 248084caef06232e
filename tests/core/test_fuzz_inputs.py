"""Fuzzing the parsers a user's text reaches (hypothesis): any input gives a parsed value or a KVSqueezeError,
never another exception."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsqueeze.bench.runner import parse_lengths, parse_methods, parse_ratios, scan_rows
from kvsqueeze.bench.tasks import jsonl, parse_tasks
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import Method, parse_method, registry

EXAMPLES = int(os.environ.get("KVSQUEEZE_FUZZ_EXAMPLES", "300"))  # more for a deeper run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = sorted(registry())
PARAM_NAMES = [*sorted({p for r in registry().values() for p in r.cls.model_fields}), "x", ""]
VALUES = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "none", "", "avg", "max", "1e999", "-0", "nan", "[1]", "a=b", ":"]),
    st.text(max_size=8),
)
COMPONENT = st.builds(
    lambda name, params: name + (":" + ",".join(f"{k}={v}" for k, v in params) if params else ""),
    st.sampled_from([*NAMES, "nosuch", "", "SNAPKV", "snap-kv"]),
    st.lists(st.tuples(st.sampled_from(PARAM_NAMES), VALUES), max_size=3),
)
SPEC = st.one_of(st.text(max_size=40), st.lists(COMPONENT, min_size=1, max_size=4).map("+".join))


def _parses_or_refuses(fn, *args):
    try:
        return fn(*args)
    except KVSqueezeError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


@FUZZ
@given(SPEC)
def test_method_spec_parser(spec):
    method = _parses_or_refuses(parse_method, spec)
    if method is not None:
        assert isinstance(method, Method)
        assert parse_method(method.spec()).spec() == method.spec()  # a normalized spec parses to itself


@FUZZ
@given(st.lists(SPEC, max_size=4).map(",".join))
def test_bench_methods_list(text):
    _parses_or_refuses(parse_methods, text)


@FUZZ
@given(st.text(max_size=30))
def test_ratios_lengths_tasks(text):
    _parses_or_refuses(parse_ratios, text)
    _parses_or_refuses(parse_lengths, text)
    if not text.strip().startswith("file:"):
        _parses_or_refuses(parse_tasks, text)


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
ROW = st.fixed_dictionaries(
    {},
    optional={
        "context": JSON_VALUE | st.text(max_size=60),
        "question": JSON_VALUE | st.text(max_size=20),
        "answer": JSON_VALUE | st.lists(st.text(max_size=5), max_size=3),
        "answer_prefix": JSON_VALUE,
        "max_new_tokens": JSON_VALUE | st.integers(-5, 10**20),
    },
)
LINE = st.one_of(
    ROW.map(lambda r: json.dumps(r).encode()), JSON_VALUE.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40)
)
LINES = st.lists(LINE, max_size=5).map(b"\n".join)


@FUZZ
@given(LINES)
def test_jsonl_dataset_loader(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(content)
        rows = _parses_or_refuses(jsonl.load, path)
        if rows is not None:
            assert rows and all(isinstance(r["context"], str) and r["answer"] for r in rows)
            samples = jsonl.generate(str(path), samples=10)
            assert len(samples) == min(len(rows), 10)


@FUZZ
@given(LINES)
def test_results_loader_never_raises(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        path.write_bytes(content)
        scan = scan_rows(path)
        assert all(isinstance(r, dict) and isinstance(r["method"], str) for r in scan.rows)
