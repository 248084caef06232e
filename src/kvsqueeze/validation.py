"""Validation of a compression request — method, ratio, budget — before any model work.

:func:`validate_budget` is pure (no model, no tensors): ``CompressedCache``, the CLI and the benchmark call it so
that a request is refused in one line when it is malformed (``budget=40.9``, ``budget=True``, ``method=123``) or
when part of it would never be applied (``--method none --ratio 0.5``: nothing is evicted, so a report of "ratio
0.5" would be untrue; ``--method kivi --budget 10``: a codec alone stores every token).

What a method applies:

- a scorer (``snapkv``, ``h2o`` …) with the default prefill schedule: a ``ratio`` *or* a ``budget``;
- a decoding schedule (``interval``, ``lazyeviction``, ``triattention``): a token ``budget`` — its own parameter
  (``interval:budget=256``) or the caller's, not both; a ``ratio`` only if the schedule declares one;
- neither (``none``, a codec alone such as ``kivi``): nothing; ``ratio=0`` is accepted as the no-op it is.
"""

from __future__ import annotations

import math
import numbers

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import Method, parse_method


def parse_method_arg(method: object) -> Method:
    """A method given as a spec string or a parsed :class:`~kvsqueeze.spec.Method`; anything else is refused."""
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise KVSqueezeError(
            f"method must be a spec string such as 'snapkv' or 'snapkv+kivi:bits=2', got {type(method).__name__} "
            f"{method!r}"
        )
    return parse_method(method)


def check_ratio(ratio: object) -> float | None:
    """``ratio`` (fraction of tokens removed) as a float in [0, 1), or None."""
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise KVSqueezeError(f"ratio must be a number in [0, 1) (fraction of tokens removed), got {ratio!r}")
    value = float(ratio)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise KVSqueezeError(f"ratio must be in [0, 1) (fraction of tokens removed), got {ratio!r}")
    return value


def check_budget(budget: object) -> int | None:
    """``budget`` (tokens kept per KV head) as a positive int, or None; a fractional or boolean budget is refused
    rather than silently truncated (``40.9`` is not 40, ``True`` is not 1)."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise KVSqueezeError(f"budget must be a whole number of tokens per KV head, got {budget!r}")
    whole = isinstance(budget, numbers.Integral) or (
        isinstance(budget, numbers.Real) and math.isfinite(float(budget)) and float(budget).is_integer()
    )
    if not whole:
        raise KVSqueezeError(f"budget must be a whole number of tokens per KV head, got {budget!r}")
    value = int(budget)
    if value < 1:
        raise KVSqueezeError(f"budget must be >= 1 token per KV head, got {budget!r}")
    return value


def check_count(value: object, what: str, fix: str = "") -> int:
    """``value`` as a whole number >= 1 (tokens to generate, workers …); a float, a bool or a smaller number is
    refused naming ``what`` (``fix``: what to do instead, appended to the message)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise KVSqueezeError(f"{what} must be a whole number >= 1, got {value!r}{fix}")
    return int(value)


def validate_budget(ratio: object, budget: object, method: object) -> tuple[float | None, int | None]:
    """Check a ``(ratio, budget, method)`` request; return ``(ratio, budget)`` normalised (float, int or None).

    Raises :class:`KVSqueezeError` (one line naming the fix) when a value is malformed, when both are given, or
    when the method would never apply what was given.
    """
    parsed = parse_method_arg(method)
    ratio_value, budget_value = check_ratio(ratio), check_budget(budget)
    if ratio_value is not None and budget_value is not None:
        raise KVSqueezeError("give either a ratio or a budget, not both")
    spec = parsed.spec().removeprefix("none+")  # "kivi", not "none+kivi"
    schedule = parsed.schedule
    fields = type(schedule).model_fields
    if getattr(parsed.codec, "retrieves", False):  # a retrieval codec: the ratio/budget set what stays hot
        if schedule.name != "prefill":
            raise KVSqueezeError(
                f"{parsed.codec.name} retrieves over the prefilled context; use the prefill schedule (drop "
                f"{schedule.name})"
            )
        return ratio_value, budget_value
    if "budget" in fields:  # a decoding schedule keeps a token budget while generating
        own_ratio = getattr(schedule, "ratio", None)
        if own_ratio is not None and (budget_value is not None or ratio_value):
            given = f"budget {budget_value}" if budget_value is not None else f"ratio {ratio_value:g}"
            raise KVSqueezeError(
                f"{spec} sets its own ratio ({own_ratio:g}); the {given} would never be applied: give one of them"
            )
        own = getattr(schedule, "budget", None)
        if own is not None and (budget_value is not None or ratio_value):
            given = f"budget {budget_value}" if budget_value is not None else f"ratio {ratio_value:g}"
            raise KVSqueezeError(
                f"{spec} sets its own budget ({own} tokens); the {given} would never be applied: give one of them"
            )
        return ratio_value, budget_value
    if not parsed.evicts and (ratio_value or budget_value is not None):
        given = f"budget {budget_value}" if budget_value is not None else f"ratio {ratio_value:g}"
        what = "the full cache" if spec == "none" else f"{spec} stores every token (a codec without a scorer)"
        raise KVSqueezeError(
            f"{what}: the {given} would never be applied; drop it, or add a scorer that evicts "
            f"(e.g. 'snapkv{'' if spec == 'none' else '+' + spec}')"
        )
    return ratio_value, budget_value
