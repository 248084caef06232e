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
