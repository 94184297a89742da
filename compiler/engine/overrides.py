"""Per-module overrides: which linears to compress, and how, by name pattern.

A rule list (a ``.json`` or ``.toml`` file for ``--overrides``, or a list of dicts in the API), first match wins::

    [[rule]]                      # TOML; JSON: {"rule": [{...}, ...]} or a bare list
    match = "lm_head"             # fnmatch pattern on the module name ("model." prefix optional)
    bits = 4                      # any option of the method (here: the run's method, at 4 bits)

    [[rule]]
    match = "layers.0.*"
    bits = 4

    [[rule]]
    match = "*.self_attn.o_proj"
    skip = true                   # keep float

    [[rule]]
    match = "layers.1[0-9].mlp.*"
    method = "rtn"                # another method for these; its options start from its defaults

Unmatched linears use the run's method and options. A rule's options are added to the run's options when it
keeps the run's method. ``lm_head`` (outside the decoder blocks) is compressed only when a rule names it; it is
calibrated on its own inputs from the quantized model. A rule that matches no linear is an error (a typo would
otherwise silently change nothing).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

_KEYS = {"match", "skip", "method"}


@dataclass
class Rule:
    match: str
    skip: bool = False
    method: str | None = None
    options: dict = field(default_factory=dict)
    index: int = 0

    def matches(self, name: str) -> bool:
        short = name[len("model."):] if name.startswith("model.") else name
        return fnmatch.fnmatchcase(name, self.match) or fnmatch.fnmatchcase(short, self.match)

    def describe(self) -> str:
        if self.skip:
            return f"rule {self.index + 1} ({self.match}): kept float"
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"rule {self.index + 1} ({self.match}): {self.method or 'run method'} {opts}".strip()


def parse_rules(raw, source: str = "overrides") -> list[Rule]:
    if isinstance(raw, dict):
        raw = raw.get("rule", raw.get("rules"))
    if not isinstance(raw, list):
        raise LowbitError(f"{source}: expected a list of rules ([[rule]] tables or a JSON list)")
    rules = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or not isinstance(r.get("match"), str) or not r["match"]:
            raise LowbitError(f"{source}: rule {i + 1} needs a non-empty string 'match'")
        skip = bool(r.get("skip", False))
        opts = {k: v for k, v in r.items() if k not in _KEYS}
        if skip and (opts or r.get("method")):
            raise LowbitError(f"{source}: rule {i + 1} ({r['match']}) has skip = true and options; choose one")
        rules.append(Rule(match=r["match"], skip=skip, method=r.get("method"), options=opts, index=i))
    return rules


def load_rules(path) -> list[Rule]:
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"--overrides file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{p}: not UTF-8 text (byte {e.start}); expected a .toml or .json rules file") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except Exception as e:
        raise LowbitError(f"{p}: cannot parse ({type(e).__name__}: {e})") from e
    return parse_rules(raw, str(p))


def first_match(rules: list[Rule], name: str) -> Rule | None:
    for r in rules:
        if r.matches(name):
            return r
    return None


class MethodPlan:
    """The method object each linear gets (``None`` = keep float), built once per rule."""

    def __init__(self, base_method, base_options: dict, rules: list[Rule]):
        from lowbit.passes.methods import build_method

        self.base = base_method
        self.rules = rules
        self.used: set[int] = set()
        self._methods = {}
        for r in rules:
            if r.skip:
                continue
            name = r.method or base_method.name
            opts = {**base_options, **r.options} if name == base_method.name else dict(r.options)
            try:
                self._methods[r.index] = build_method(name, **opts)
            except (ValueError, TypeError) as e:
                raise LowbitError(f"overrides: {r.describe()}: {e}") from e

    def method_for(self, name: str):
        r = first_match(self.rules, name)
        if r is None:
            return self.base, None
        self.used.add(r.index)
        return (None if r.skip else self._methods[r.index]), r

    @property
    def methods(self) -> list:
        """Every method object the plan uses: the run's own, then one per rule that is not a skip."""
        return [self.base, *self._methods.values()]

    @property
    def needs_data(self) -> bool:
        return any(m.needs_data for m in self.methods)

    def precheck(self, names) -> None:
        """Fail before calibration if a rule matches none of the model's linear names."""
        names = list(names)
        bad = [r for r in self.rules if not any(r.matches(n) for n in names)]
        if bad:
            raise LowbitError("overrides: " + "; ".join(f"rule {r.index + 1} (match = {r.match!r}) matches no linear "
                                                         f"(names look like {names[0]!r})" for r in bad))

    def check_all_used(self) -> None:
        unused = [r for r in self.rules if r.index not in self.used]
        if unused:
            raise LowbitError("overrides: " + "; ".join(f"rule {r.index + 1} (match = {r.match!r}) matches no linear"
                                                         for r in unused))
