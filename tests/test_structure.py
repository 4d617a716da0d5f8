"""The package's shape: imports point one way, files stay small, models depend on a format.

Tier: no PG (reads the source with ast; one subprocess imports every module).

The import graph is built from the source: every `import` / `from ... import` of a boltz_cp
module, at module level and inside functions alike (a function-level import is still a
dependency, only a deferred one). `from pkg import name` points at `pkg.name` when that is a
module, else at `pkg` (its __init__). Importing `a.b.c` does not count as importing `a.b`'s
__init__ (that edge would put every package on a cycle with its own submodules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "boltz_cp"
MAX_LINES = 600
# Files under benchmarks/ still importing boltz_cp.cli, each with where its name now lives. An
# entry whose file is gone must be removed (the test fails on it), so the list only shrinks.
CLI_IMPORT_EXCEPTIONS: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known) -> set[str]:
    """The modules `path` (module `name`) imports, resolved against `known` where it can be."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name, modules) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_files():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_and_modules_do_not_import_the_featurizer():
    """They read the compact-feature format (boltz_cp.data.compact), not the featurizer."""
    bad = sorted(name for name, deps in _graph().items()
                 if name.startswith(("boltz_cp.models", "boltz_cp.modules")) and "boltz_cp.data.features" in deps)
    assert not bad, bad


def test_files_stay_small():
    big = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}"


def test_benchmarks_do_not_import_the_cli():
    files = sorted((REPO / "benchmarks").rglob("*.py"))
    for rel in CLI_IMPORT_EXCEPTIONS:
        assert (REPO / rel).is_file(), f"{rel} is gone: remove it from CLI_IMPORT_EXCEPTIONS"
    bad = []
    for path in files:
        rel = str(path.relative_to(REPO))
        if rel in CLI_IMPORT_EXCEPTIONS:
            continue
        deps = _imports(path, _module_name(path), set())
        bad += [f"{rel}: {m}" for m in sorted(deps) if m == "boltz_cp.cli" or m.startswith("boltz_cp.cli.")]
    assert not bad, bad


ISOLATED_IMPORTS = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "boltz_cp" or m.startswith("boltz_cp.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=3)[-600:]
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    """Each module imports with no boltz_cp module loaded before it (one interpreter; boltz_cp's
    modules are dropped from sys.modules before each; third-party ones stay). `__main__` modules
    run their command on import and are left out."""
    names = [n for n in _modules() if not n.endswith("__main__")]
    r = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, json.dumps(names)], capture_output=True,
                       text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
