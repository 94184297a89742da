"""Pass protocol and manager.

A pass is any object with a ``name`` and ``run(gm, ctx) -> PassReport``; it may mutate the
``torch.fx.GraphModule`` in place. The manager runs passes in order, lints the graph after each one,
and on failure raises :class:`PassError` naming the pass and the passes that ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class PassReport:
    """What a pass did: counts of changes per kind, and every site it skipped with the reason."""

    name: str
    changed: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        ch = ", ".join(f"{k}: {v}" for k, v in self.changed.items()) or "no changes"
        sk = f"; skipped {len(self.skipped)}" if self.skipped else ""
        return f"{self.name}: {ch}{sk}"

    def to_json(self) -> dict:
        return {"name": self.name, "changed": self.changed,
                "skipped": [{"site": s, "reason": r} for s, r in self.skipped], "details": self.details}


@dataclass
class PassContext:
    """State shared by passes: calibration results and data for verification."""

    results: dict = field(default_factory=dict)  # module name -> format
    float_weights: dict = field(default_factory=dict)  # module name -> (out, in) float weight
    calib_batch: torch.Tensor | None = None  # token ids for verification
    module_prefix: str = "model."  # attribute of the export wrapper that holds the HF model
    sites: list = field(default_factory=list)  # filled by FindLinearSites
    replaced: dict = field(default_factory=dict)  # module name -> {tensor name: graph attribute}
    metrics: dict = field(default_factory=dict)  # module name -> verification numbers


class Pass(Protocol):
    name: str

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport: ...


class PassError(RuntimeError):
    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException):
        before = ", ".join(ran_before) if ran_before else "none"
        super().__init__(f"pass {pass_name!r} failed (passes run before it: {before}): {type(cause).__name__}: {cause}")
        self.pass_name = pass_name
        self.ran_before = ran_before


class PassManager:
    def __init__(self, passes: list, log=None):
        self.passes = list(passes)
        self.log = log

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> list[PassReport]:
        reports, ran = [], []
        for p in self.passes:
            name = getattr(p, "name", type(p).__name__)
            try:
                rep = p.run(gm, ctx)
                if not isinstance(rep, PassReport):
                    raise TypeError(f"returned {type(rep).__name__}, expected PassReport")
                gm.graph.lint()
                gm.recompile()
            except Exception as e:
                raise PassError(name, ran, e) from e
            reports.append(rep)
            ran.append(name)
            if self.log:
                self.log(f"[passes] {rep.summary()}")
        return reports
