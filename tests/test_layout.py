"""The layout's rules, read from the source with ``ast`` (nothing is imported):

- no import cycles in ``ray_vdr``, ``serving``, ``bench`` and ``tests`` (imports inside functions count: a lazy
  import is still a dependency);
- ``ray_vdr`` never imports ``serving`` (the app builds on the library, not the other way round), and neither imports
  ``bench`` or ``tests``;
- no private name (``_name``) is imported or used across modules; a test may reach into the module it tests (the
  library's or the app's), never into another test module;
- no source file over 400 lines, except the typed config, which holds only schemas and their loading;
- ``jobs/*.py`` stay thin: they parse nothing and call ``ray_vdr.cli.main``;
- every module of the library, the app, ``jobs`` and ``bench`` says in its docstring's first line what it holds;
- tests/ mirrors ray_vdr/: a test folder per subpackage.

Each rule is a function of a module map (name → file), so that ``test_the_rules_catch_violations`` can show on a small
tree of its own that each one fails where it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ray_vdr", "serving", "bench", "tests")
DOCUMENTED = ("ray_vdr", "serving", "jobs", "bench")
MAX_LINES = 400
CONFIG = "ray_vdr.config"

Modules = dict[str, Path]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_map(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Modules:
    return {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


MODULES = module_map()


def _resolve(name: str, modules: Modules) -> str | None:
    """The project module ``name`` refers to (itself, or the package holding an imported attribute), else None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, modules: Modules) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in ``module``, at any depth."""
    tree = ast.parse(modules[module].read_text())
    package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name, modules)) is not None:
                    found.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from pkg import module`
                    found.append((sub, [], node.lineno))
                elif (target := _resolve(base, modules)) is not None:
                    found.append((target, [alias.name], node.lineno))
    return found


def import_cycles(modules: Modules) -> list[list[str]]:
    graph = {m: {t for t, _, _ in _imports(m, modules) if t != m} for m in modules}
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
    return cycles


def upward_imports(modules: Modules) -> list[str]:
    """Imports against the direction of the layers: library → app, library or app → bench or tests."""
    above = {"ray_vdr": {"serving", "bench", "tests"}, "serving": {"bench", "tests"}}
    return [f"{m}:{line} imports {t}" for m in modules for t, _, line in _imports(m, modules)
            if t.split(".")[0] in above.get(m.split(".")[0], set())]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _crosses(module: str, target: str) -> bool:
    """Whether ``module`` taking a private name of ``target`` crosses a module boundary the rule forbids."""
    return target != module and (module.split(".")[0] != "tests" or target.split(".")[0] == "tests")


def _script_private_imports(module: str, tree: ast.Module, modules: Modules) -> list[str]:
    """Private names imported by the Python scripts a module holds as strings (code it runs in a subprocess). Not in
    tests/, whose strings are also the self-check's sample files."""
    if module.split(".")[0] == "tests":
        return []
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value):
            continue
        try:
            script = ast.parse(node.value)
        except SyntaxError:  # prose
            continue
        for imp in ast.walk(script):
            if isinstance(imp, ast.ImportFrom) and imp.module and (target := _resolve(imp.module, modules)):
                bad += [f"{module}:{node.lineno + imp.lineno - 1} (a script in a string) imports {target}.{a.name}"
                        for a in imp.names if _private(a.name) and _crosses(module, target)]
    return bad


def private_uses(modules: Modules) -> list[str]:
    bad = []
    for m, path in modules.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name → project module it is bound to
        for target, names, line in _imports(m, modules):
            bad += [f"{m}:{line} imports {target}.{n}" for n in names if _private(n) and _crosses(m, target)]
        bad += _script_private_imports(m, tree, modules)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _resolve(a.name, modules) is not None:
                        aliases[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in aliases:
                    target = _resolve(".".join([aliases[value.id], *reversed(chain[1:])]), modules)
                    if target is not None and _crosses(m, target):
                        bad.append(f"{m}:{node.lineno} uses {target}.{node.attr}")
    return bad


def too_long(paths: list[Path], root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)}: {n} lines" for p in paths
            if (n := len(p.read_text().splitlines())) > MAX_LINES and _module_name(p, root) != CONFIG]


def undocumented(paths: list[Path], root: Path = ROOT) -> list[str]:
    missing = []
    for p in paths:
        if p.name == "__init__.py" and not p.read_text().strip():
            missing.append(f"{p.relative_to(root)}: empty package marker, say what the package holds")
            continue
        doc = ast.get_docstring(ast.parse(p.read_text()))
        first = (doc or "").strip().splitlines()[0] if doc else ""
        if len(first.split()) < 4:
            missing.append(f"{p.relative_to(root)}: {first!r}")
    return missing


def _python_files(*folders: str, root: Path = ROOT) -> list[Path]:
    return [p for f in folders for p in sorted((root / f).rglob("*.py"))]


def test_no_import_cycles():
    cycles = import_cycles(MODULES)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_app_the_benches_or_the_tests():
    bad = upward_imports(MODULES)
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module():
    bad = private_uses(MODULES)
    assert not bad, "\n".join(bad)


def test_no_source_file_over_the_limit():
    long = too_long(_python_files("ray_vdr", "serving", "jobs", "bench", "tests"))
    assert not long, f"split these (at most {MAX_LINES} lines):\n" + "\n".join(long)


def test_every_module_says_what_it_holds():
    missing = undocumented(_python_files(*DOCUMENTED))
    assert not missing, "modules without a first docstring line saying what they hold:\n" + "\n".join(missing)


def test_the_rules_catch_violations(tmp_path):
    """A small tree with one violation of each rule, and a test's allowed look at the library's internals."""
    files = {
        "ray_vdr/__init__.py": '"""The library package of the self-check."""',
        "ray_vdr/a.py": '"""x"""\nfrom ray_vdr import b\n\nb._hidden()\n',
        "ray_vdr/b.py": '"""The module the self-check imports in a cycle."""\ndef f():\n    from ray_vdr.a import g\n',
        "ray_vdr/c.py": '"""The module of the self-check that imports a test."""\nimport tests.helpers\n',
        "ray_vdr/d.py": '"""The self-check\'s module with a script."""\nS = """\nfrom ray_vdr.b import _hidden\n"""\n',
        "tests/__init__.py": "",
        "tests/helpers.py": "def _private():\n    pass\n" + "\n" * MAX_LINES,
        "tests/test_x.py": "from tests.helpers import _private\nfrom ray_vdr.b import _internal\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, paths = module_map(tmp_path, ("ray_vdr", "tests")), _python_files("ray_vdr", "tests", root=tmp_path)
    assert import_cycles(modules) == [["ray_vdr.a", "ray_vdr.b", "ray_vdr.a"]]
    assert upward_imports(modules) == ["ray_vdr.c:2 imports tests.helpers"]
    assert private_uses(modules) == ["ray_vdr.a:4 uses ray_vdr.b._hidden",
                                     "ray_vdr.d:3 (a script in a string) imports ray_vdr.b._hidden",
                                     "tests.test_x:1 imports tests.helpers._private"]
    assert too_long(paths, tmp_path) == [f"tests/helpers.py: {MAX_LINES + 2} lines"]
    assert undocumented(paths, tmp_path) == ["ray_vdr/a.py: 'x'", "tests/__init__.py: empty package marker, say what "
                                             "the package holds", "tests/helpers.py: ''", "tests/test_x.py: ''"]


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


def test_tests_mirror_the_library():
    subpackages = sorted(p.parent.name for p in (ROOT / "ray_vdr").glob("*/__init__.py"))
    assert subpackages == ["corpus", "data", "eval", "models", "queries", "train"]
    for sub in subpackages:
        assert list((ROOT / "tests" / sub).glob("test_*.py")), f"tests/{sub}/ holds no tests of ray_vdr/{sub}/"
    assert list((ROOT / "tests" / "serving").glob("test_*.py"))
