"""The house rules of the layout: the stages sit on the two artefact packages (``store``, ``rundir``),
every import runs down the levels below (never up, never sideways between stages), and no two modules
import each other (directly or through a chain), even lazily."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harvest", "synth", "store", "rundir", "train", "interop", "evaluate", "report")
LEVELS = {
    # root modules: everyone may import them; among themselves only ``errors``
    "sae": 0, "errors": 0, "outputs": 0, "progress": 0, "params": 0, "model": 0, "registry": 0,
    "cluster": 0, "tracking": 0,
    "store": 1, "rundir": 1,                               # the two artefacts
    "harvest": 2, "synth": 2, "train": 2, "interop": 2, "latents": 2,  # stages that write or convert them
    "evaluate": 3,
    "report": 4,
    "cli": 5, "__main__": 6,
}
"""Level of each top-level module or package: an import must go to a strictly lower level."""


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
            if target == "sae" or target.startswith("sae."):  # not sae_lens
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import tasks`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "sae" or a.name.startswith("sae."))
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


def _library_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks")
            and not p.relative_to(ROOT).parts[0].startswith(".") and "egg-info" not in str(p)]


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__version__" else "sae"


def test_every_import_runs_down_the_levels() -> None:
    wrong = []
    for p in _library_files():
        src = _top(_module_name(p))
        assert src in LEVELS, f"{p.relative_to(ROOT)}: a new top-level module; give it a level in LEVELS"
        for t in _imports(p):
            dst = _top(t)
            if dst == src or (LEVELS[src] == 0 and dst in ("errors", "sae")):
                continue
            if LEVELS.get(dst, 99) >= LEVELS[src]:
                wrong.append(f"{p.relative_to(ROOT)} imports {t} ({src} → {dst})")
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(sorted(wrong))


def test_evaluation_and_report_import_no_training_and_training_no_interop() -> None:
    rules = {"evaluate": ("sae.train", "sae.report"), "report": ("sae.train", "sae.evaluate"),
             "train": ("sae.interop", "sae.evaluate", "sae.report"), "interop": ("sae.evaluate", "sae.train"),
             "rundir": ("sae.train", "sae.evaluate", "sae.report", "sae.interop", "sae.store")}
    for pkg, banned in rules.items():
        for p in (ROOT / pkg).rglob("*.py"):
            bad = [t for t in _imports(p) if t.startswith(banned)]
            assert not bad, f"{p.relative_to(ROOT)} imports {bad}"


def test_report_loads_no_evaluation_at_run_time() -> None:
    code = ("import sys, sae.report; "
            "print(sorted(m for m in sys.modules if m.startswith(('sae.evaluate', 'sae.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert eval(out.stdout) == [], out.stdout


def test_no_variant_or_evaluation_reaches_into_the_report() -> None:
    for p in (ROOT / "evaluate").rglob("*.py"):
        assert not any(t.startswith("sae.report") for t in _imports(p)), p


def test_the_architecture_doc_lists_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^- `([\w/]+\.py)` — ", text.split("## Module list", 1)[1], flags=re.M))
    tree = {str(p.relative_to(ROOT)) for p in _library_files()}
    assert listed == tree, (f"in the tree but not in docs/architecture.md: {sorted(tree - listed)}; "
                            f"listed but gone: {sorted(listed - tree)}")
