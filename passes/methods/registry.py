"""The method registry by name: :func:`get_method` and :func:`build_method` (imports every method module,
each of which registers itself with :func:`lowbit.passes.methods.base.register`)."""

from __future__ import annotations

from dataclasses import fields

from . import apiq, billm, efficientqat, gptq, reallm, rtn  # noqa: F401  (populate the registry)
from .base import REGISTRY, Method


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_method(name: str, **options) -> Method:
    """Instantiate a method from keyword options; unknown options raise a clear error."""
    cls = get_method(name)
    known = {f.name for f in fields(cls.Config)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"method {name!r} does not take option(s) {sorted(unknown)}; it takes {sorted(known)}")
    return cls(cls.Config(**options))
