"""Method specs parse into one component per axis; every mistake is one line that lists what is valid."""

from __future__ import annotations

import sys

import pytest

from kvsqueeze import KVSqueezeError
from kvsqueeze.spec import AXES, parse_method, registry


def test_defaults_fill_every_axis():
    method = parse_method("snapkv")
    assert (method.scorer.name, method.budget.name, method.codec.name, method.schedule.name) == (
        "snapkv",
        "uniform",
        "dense",
        "prefill",
    )


def test_parameters_are_typed_and_round_trip():
    method = parse_method("snapkv:window=16,kernel=7,pool=max")
    assert (method.scorer.window, method.scorer.kernel, method.scorer.pool) == (16, 7, "max")
    assert parse_method(method.spec()) == method
    assert parse_method("SnapKV").spec() == "snapkv"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", r"unknown method component 'nosuch'; valid: .*snapkv"),
        ("snapkv:size=3", r"unknown parameter\(s\) size for 'snapkv'; valid: window, kernel, pool"),
        ("snapkv:window=abc", r"bad parameters for 'snapkv': window"),
        ("snapkv:window=0", r"bad parameters for 'snapkv': window"),
        ("snapkv:pool=median", r"bad parameters for 'snapkv': pool"),
        ("snapkv:window", r"bad parameter 'window'"),
        ("snapkv+h2o", r"two scorer components in 'snapkv\+h2o'"),
        ("", r"empty method spec"),
    ],
)
def test_mistakes_are_one_line_errors(spec, message):
    with pytest.raises(KVSqueezeError, match=message) as info:
        parse_method(spec)
    assert "\n" not in str(info.value)


def test_registry_cites_a_paper_for_every_published_method():
    for row in registry().values():
        assert row.axis in AXES and row.paper, row.name
        if row.arxiv:
            docs = (sys.modules[row.cls.__module__].__doc__ or "") + (row.cls.__doc__ or "")
            assert row.arxiv in docs, f"{row.name}: docstring must cite arXiv {row.arxiv}"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("snapkv:window=8,window=16", r"parameter 'window' given twice in 'snapkv:window=8,window=16'"),
        ("snapkv+kivi:bits=2,bits=4", r"parameter 'bits' given twice"),
    ],
)
def test_a_parameter_given_twice_is_refused_not_last_wins(spec, message):
    with pytest.raises(KVSqueezeError, match=message):
        parse_method(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kivi:residual=-1", "kivi: residual must be >= 0, got -1"),
        ("kivi:group=0", "kivi: group must be >= 1, got 0"),
        ("int:group=0", "int: group must be >= 1"),
        ("int:size=-1", "int: size must be >= 0"),
        ("quest:page=0", "quest: page must be >= 1"),
        ("icecache:page=0", "icecache: page must be >= 1"),
        ("quest:select=bogus", "use select=token or select=step"),
        ("a2ats:group=16", "keeps decoded tokens in its hot window; drop group="),
        ("leoam:warm=0.5", "add tier=disk"),
        ("gear:rank=-1", "gear needs"),
        ("mikv:ratio=2", "mikv ratio"),
        ("bfp:block=0", "block >= 1"),
        ("qjl:out_sketch=12", "out_sketch a positive multiple of 8"),
        ("h2o:recent_fraction=2", "bad parameters for 'h2o': recent_fraction"),
        ("streaming_llm:sinks=-1", "bad parameters for 'streaming_llm': sinks"),
        ("snapkv+zipcache:probe=nan", "probe: Input should be a finite number"),
    ],
)
def test_parameters_no_model_can_use_are_refused_when_parsed(spec, message):
    """Checked when the spec is parsed (``kvsqueeze bench`` validates its methods before any cell runs), not when a
    cache first compresses."""
    with pytest.raises(KVSqueezeError, match=message) as info:
        parse_method(spec)
    assert "\n" not in str(info.value)
