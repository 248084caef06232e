"""Method specs (``snapkv:window=32+kivi:bits=2``) and the registry of method components.

A method is one component per axis:

- ``scorer``   — which tokens to keep (scores, or a structured selection rule)
- ``budget``   — how the kept-token budget is split across layers and heads
- ``codec``    — how kept tokens are stored
- ``schedule`` — when compression runs (prefill, every N decode steps, …)

Every component is a pydantic model whose fields are its spec parameters, registered with ``@register``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from kvsqueeze.errors import KVSqueezeError

Axis = Literal["scorer", "budget", "codec", "schedule"]
AXES: tuple[Axis, ...] = ("scorer", "budget", "codec", "schedule")
DEFAULTS: dict[Axis, str] = {"scorer": "none", "budget": "uniform", "codec": "dense", "schedule": "prefill"}


class Component(BaseModel):
    """A spec component. Subclasses declare their parameters as pydantic fields."""

    # nan/inf are refused for every float parameter: no component has a use for them (a nan ratio passes every
    # ``<``/``>`` check and fails deep inside)
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)

    name: ClassVar[str] = ""
    axis: ClassVar[Axis]
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str | None] = None
    version: ClassVar[int] = 1  # of what the component stores: bump it when that changes (saved caches check it)

    def check(self) -> None:
        """Refuse parameter values no model can use beyond what the field types say (raise
        :class:`~kvsqueeze.errors.KVSqueezeError`, one line naming the fix). It runs whenever a component is built, so
        a bad spec fails when it is parsed (``kvsqueeze bench`` before any cell runs); what depends on the model (its
        head dimension, its RoPE) is checked when a cache is built for it or first compresses."""

    @model_validator(mode="after")
    def _checked(self):
        self.check()
        return self

    def spec(self) -> str:
        """This component as a spec string, listing only parameters that differ from their defaults."""
        changed = []
        for key, field in type(self).model_fields.items():
            value = getattr(self, key)
            if value != field.default:
                changed.append(f"{key}={value}")
        return self.name + (":" + ",".join(changed) if changed else "")


@dataclass(frozen=True)
class Registered:
    """A registry row: what `kvsqueeze methods` lists."""

    name: str
    axis: Axis
    family: str
    paper: str
    arxiv: str | None
    cls: type[Component]

    @property
    def params(self) -> str:
        return ", ".join(f"{k}={f.default}" for k, f in self.cls.model_fields.items() if f.default is not None)


REGISTRY: dict[str, Registered] = {}


def register(cls: type[Component]) -> type[Component]:
    """Class decorator: add a component to the registry under its ``name``."""
    if not cls.name or cls.name in REGISTRY:
        raise RuntimeError(f"component name missing or registered twice: {cls.name!r}")
    REGISTRY[cls.name] = Registered(cls.name, cls.axis, cls.family, cls.paper, cls.arxiv, cls)
    return cls


def registry() -> dict[str, Registered]:
    """Every registered component (the package's ``__init__`` imports the modules that register them)."""
    return REGISTRY


@dataclass(frozen=True)
class Method:
    """A parsed method: one component per axis."""

    scorer: Component
    budget: Component
    codec: Component
    schedule: Component

    @property
    def evicts(self) -> bool:
        return self.scorer.name != "none"

    def spec(self) -> str:
        parts = [self.scorer.spec()]
        parts += [getattr(self, a).spec() for a in AXES[1:] if getattr(self, a).name != DEFAULTS[a]]
        return "+".join(parts)


def _one_line(exc: ValidationError, name: str) -> str:
    problems = []
    for err in exc.errors():
        own = err.get("ctx", {}).get("error")
        if isinstance(own, KVSqueezeError):  # raised by the component's ``check``: its message names the fix
            return str(own)
        loc = ".".join(str(x) for x in err["loc"]) or "value"
        problems.append(f"{loc}: {err['msg']}")
    return f"bad parameters for {name!r}: " + "; ".join(problems)


def make_component(name: str, **params) -> Component:
    """Build one registered component by name, validating its parameters."""
    reg = registry()
    if name not in reg:
        raise KVSqueezeError(f"unknown method component {name!r}; valid: {', '.join(sorted(reg))}")
    cls = reg[name].cls
    unknown = sorted(set(params) - set(cls.model_fields))
    if unknown:
        valid = ", ".join(cls.model_fields) or "(none)"
        raise KVSqueezeError(f"unknown parameter(s) {', '.join(unknown)} for {name!r}; valid: {valid}")
    try:
        return cls(**params)
    except ValidationError as exc:
        raise KVSqueezeError(_one_line(exc, name)) from None


def split_params(args: str, text: str) -> dict[str, str]:
    """``key=value,key=value`` (the part of ``text`` after ``NAME:``) as a dict; an item without ``=`` or a key
    given twice is refused (a repeated key would otherwise silently override the first)."""
    params: dict[str, str] = {}
    for item in args.split(",") if args else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise KVSqueezeError(f"bad parameter {item!r} in {text.strip()!r}; write NAME:key=value,key=value")
        if key in params:
            raise KVSqueezeError(f"parameter {key!r} given twice in {text.strip()!r}; give each parameter once")
        params[key] = value.strip()
    return params


def parse_component(text: str) -> Component:
    name, _, args = text.strip().partition(":")
    return make_component(name.strip().lower().replace("-", "_"), **split_params(args, text))


def parse_method(spec: str | Method) -> Method:
    """Parse ``NAME[:k=v,...]`` joined by ``+`` into a :class:`Method` (one component per axis)."""
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise KVSqueezeError("empty method spec; try `kvsqueeze methods` for the list, e.g. 'snapkv'")
    chosen: dict[str, Component] = {}
    for part in spec.split("+"):
        if not part.strip():
            raise KVSqueezeError(
                f"empty component in {spec!r}; join one component per axis with '+', e.g. 'snapkv+kivi'"
            )
        comp = parse_component(part)
        if (
            comp.axis == "codec"
            and "codec" in chosen
            and any(getattr(c, "retrieves", False) for c in (comp, chosen["codec"]))
        ):
            raise KVSqueezeError(
                f"{spec!r}: a retrieval codec keeps its cold copy at the model's dtype and does not compose with "
                "another codec yet; use it alone (quest) or after a scorer (snapkv+quest)"
            )
        if comp.axis in chosen:
            raise KVSqueezeError(
                f"two {comp.axis} components in {spec!r}: {chosen[comp.axis].name!r} and {comp.name!r}; "
                f"use one per axis ({', '.join(AXES)})"
            )
        chosen[comp.axis] = comp
    for axis in AXES:
        if axis not in chosen:
            chosen[axis] = make_component(DEFAULTS[axis])
    return Method(**chosen)
