"""The package's imports point one way: from a higher layer to a lower one, never back, and never in a cycle.

Every import counts, including those inside functions (they hide a cycle, they do not remove it).
:data:`LAYERS` is the one place where the order is written, lowest first; a module belongs to the layer of
the longest prefix that names it. A module may import a module of a lower layer, or of its own layer when
both lie in the same package (``lowbit.passes.methods.gptq`` may import ``lowbit.passes.methods.quant``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the ``lowbit`` package

LAYERS = [
    # leaves: the error type every layer raises for bad user input, and the version
    "lowbit.errors",
    "lowbit.version",
    # plain torch: formats, packing, the lowbit::* ops and their eager references, artifacts, nn.Module wrappers
    "lowbit.runtime",
    # Triton implementations of the runtime's ops (registered as their CUDA kernels)
    "lowbit.kernels",
    # graph passes over exported programs, and the default pipeline of them
    "lowbit.passes",
    # calibration methods and the training loop they share with lowbit-finetune
    "lowbit.passes.methods",
    # the compiler: its error type, then the engine, the lowerings, training, and the front end
    "lowbit.compiler",
    "lowbit.compiler.engine",
    "lowbit.compiler.lowering",
    "lowbit.compiler.training",
    "lowbit.compiler.frontend",
    # the public Python API and the package itself
    "lowbit.api",
    "lowbit",
]
SUBPACKAGES = ("compiler", "passes", "runtime", "kernels")


def _modules() -> dict[str, Path]:
    mods = {"lowbit": ROOT / "__init__.py"}
    for f in ROOT.glob("*.py"):
        if f.name != "__init__.py":
            mods[f"lowbit.{f.stem}"] = f
    for sub in SUBPACKAGES:
        for f in (ROOT / sub).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("lowbit",) + (parts[:-1] if parts[-1] == "__init__" else parts))
            mods[name] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The lowbit modules ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _layer(mod: str) -> tuple[int, str]:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS.index(best), best


def _graph():
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_layer_table_names_existing_packages():
    mods = set(_modules())
    for p in LAYERS:
        assert p in mods, f"LAYERS names {p}, which is not a module of the package"


def test_imports_point_down():
    bad = []
    for mod, targets in sorted(_graph().items()):
        (lm, pm) = _layer(mod)
        for t in sorted(targets):
            (lt, pt) = _layer(t)
            if lt > lm or (lt == lm and pt != pm):
                bad.append(f"{mod} ({pm}) imports {t} ({pt})")
    assert not bad, "imports from a lower layer to a higher one:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    # the walker resolves relative imports, imports inside functions, and ``from pkg import module``
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..compiler.engine import calibrate\n    from . import formats\n")
    got = _imports("lowbit.runtime.m", src, {"lowbit.compiler.engine.calibrate", "lowbit.runtime.formats",
                                              "lowbit.compiler.engine"})
    assert got == {"lowbit.compiler.engine.calibrate", "lowbit.runtime.formats"}
    assert _layer("lowbit.compiler.engine.calibrate")[0] > _layer("lowbit.runtime.m")[0]
