"""The house rules of the layout: the report imports no evaluation but the result format, and no
two modules of the package import each other (directly or through a chain), even lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harvest", "store", "train", "evaluate", "report")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["sae", *parts])


def _imports(path: Path) -> set[str]:
    """Every sae module ``path`` imports, at module level or inside functions."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("sae"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import tasks`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sae"))
    return out


def test_no_import_cycles_between_modules() -> None:
    files = [p for p in ROOT.rglob("*.py") if p.parts[len(ROOT.parts)] in (*PACKAGES,) or p.parent == ROOT]
    files = [p for p in files if "tests" not in p.parts and "benchmarks" not in p.parts and p.name != "__main__.py"]
    mods = {_module_name(p): p for p in files}
    graph = {m: {t for t in _imports(p) if t in mods and t != m} for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle through its children
    for m in graph:
        graph[m] = {t for t in graph[m] if not (mods[m].name == "__init__.py" and t.startswith(m + "."))}
        graph[m] = {t for t in graph[m] if not (mods[t].name == "__init__.py" and m.startswith(t + "."))}
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for t in graph[m]:
            if seen.get(t) == 1:
                raise AssertionError("import cycle: " + " → ".join([*stack[stack.index(t):], t]))
            if t not in seen:
                visit(t, [*stack, t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])


def test_report_imports_no_evaluation_but_results() -> None:
    code = "import sys, sae.report; print(sorted(m for m in sys.modules if m.startswith('sae.evaluate')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert set(eval(out.stdout)) <= {"sae.evaluate", "sae.evaluate.results"}, out.stdout


def test_no_variant_or_evaluation_reaches_into_the_report() -> None:
    for p in (ROOT / "evaluate").rglob("*.py"):
        assert not any(t.startswith("sae.report") for t in _imports(p)), p
