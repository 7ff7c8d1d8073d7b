"""The layout's rules, read from the source with ``ast`` (nothing is imported):

- no import cycles inside ``ray_vdr`` and ``serving`` (imports inside functions count: a lazy import is still a
  dependency);
- ``ray_vdr`` never imports ``serving`` (the app builds on the library, not the other way round);
- no private name (``_name``) is imported or used across modules;
- no source file over 400 lines, except the typed config, which holds only schemas and their loading;
- ``jobs/*.py`` stay thin: they parse nothing and call ``ray_vdr.cli.main``;
- every module's docstring says in its first line what it holds;
- tests/ mirrors ray_vdr/: a test folder per subpackage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ray_vdr", "serving")
MAX_LINES = 400
CONFIG = "ray_vdr.config"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _sources()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (itself, or the package holding an imported attribute), else None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in ``module``, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name)) is not None:
                    found.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from pkg import module`
                    found.append((sub, [], node.lineno))
                elif (target := _resolve(base)) is not None:
                    found.append((target, [alias.name], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def test_no_import_cycles():
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_app():
    bad = [f"{m}:{line} imports {t}" for m in MODULES if m.startswith("ray_vdr")
           for t, _, line in _imports(m) if t.split(".")[0] == "serving"]
    assert not bad, "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_crosses_a_module():
    bad = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name → project module it is bound to
        for target, names, line in _imports(m):
            bad += [f"{m}:{line} imports {target}.{n}" for n in names if _private(n) and target != m]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _resolve(a.name) is not None:
                        aliases[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in aliases:
                    target = _resolve(".".join([aliases[value.id], *reversed(chain[1:])]))
                    if target is not None and target != m:
                        bad.append(f"{m}:{node.lineno} uses {target}.{node.attr}")
    assert not bad, "\n".join(bad)


def _python_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def test_no_source_file_over_the_limit():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _python_files(*PACKAGES, "jobs", "bench", "tests")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and _module_name(p) != CONFIG]
    assert not long, f"split these (at most {MAX_LINES} lines):\n" + "\n".join(long)


def test_the_config_module_holds_only_schemas_and_their_loading():
    """ray_vdr/config.py may exceed the line limit because it is the one typed schema; anything else goes elsewhere."""
    from pydantic import BaseModel

    from ray_vdr import config

    tree = ast.parse(MODULES[CONFIG].read_text())
    loading = {"apply_overrides", "load_config", "dump_config", "resolve_paths"}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(config, node.name)
            assert issubclass(cls, (BaseModel, ValueError)), f"{node.name} is neither a schema nor its error"
        elif isinstance(node, ast.FunctionDef):
            assert node.name in loading or _private(node.name), f"{node.name}: not loading, move it out of config.py"


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_jobs_are_thin_entrypoints(job):
    text = (ROOT / "jobs" / job).read_text()
    tree = ast.parse(text)
    assert len(text.splitlines()) <= 40, f"jobs/{job} grew past 40 lines: put the logic in ray_vdr/"
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "sys", "pathlib", "ray_vdr.cli"}, imported
    assert not any(isinstance(n, ast.FunctionDef) for n in tree.body), "a job defines no functions"
    assert "main([" in text, "a job hands its arguments to ray_vdr.cli.main"


def test_every_module_says_what_it_holds():
    missing = []
    for p in _python_files(*PACKAGES, "jobs", "bench"):
        if p.name == "__init__.py" and not p.read_text().strip():
            missing.append(f"{p.relative_to(ROOT)}: empty package marker, say what the package holds")
            continue
        doc = ast.get_docstring(ast.parse(p.read_text()))
        first = (doc or "").strip().splitlines()[0] if doc else ""
        if len(first.split()) < 4:
            missing.append(f"{p.relative_to(ROOT)}: {first!r}")
    assert not missing, "modules without a first docstring line saying what they hold:\n" + "\n".join(missing)


def test_tests_mirror_the_library():
    subpackages = sorted(p.parent.name for p in (ROOT / "ray_vdr").glob("*/__init__.py"))
    assert subpackages == ["corpus", "data", "eval", "models", "queries", "train"]
    for sub in subpackages:
        assert list((ROOT / "tests" / sub).glob("test_*.py")), f"tests/{sub}/ holds no tests of ray_vdr/{sub}/"
    assert list((ROOT / "tests" / "serving").glob("test_*.py"))
