"""The import structure: minipeft's modules import each other in one direction, at the top of each file, and
the folder kernels/ is importable only as `minipeft.kernels`.

A circle of imports (a imports b, b imports a) works only while one side hides its import inside a function,
so the first tests read every file's syntax tree (`ast`; nothing is imported) and list each circle and each
hidden import as `file:line import`. The last tests start fresh interpreters to check that installing
minipeft leaves no top-level `kernels` package in the way of Hugging Face's, which bitsandbytes imports.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
# (folder, the package it is installed as): see [tool.setuptools.package-dir] in pyproject.toml
SOURCE_TREES = ((REPO / "minipeft", "minipeft"), (REPO / "kernels", "minipeft.kernels"))
KERNELS_MAY_IMPORT = {"torch", "triton"}  # besides the standard library and minipeft.kernels itself
MAX_CYCLES = 50  # enough for a checklist; the enumeration is exponential in the worst case


class Module(NamedTuple):
    name: str         # the import name: "minipeft.tuners.io"
    is_package: bool  # an __init__.py: its relative imports resolve against the module itself
    path: str         # as messages show it: "minipeft/tuners/io.py"
    source: str


class Import(NamedTuple):
    target: str         # the module named, absolute: "minipeft.tuners" for `from minipeft.tuners import LoraConfig`
    line: int
    text: str           # the statement on one line: "from minipeft.tuners import io"
    in_function: bool   # runs when a function is called, not when the module is imported
    type_checking: bool  # under `if TYPE_CHECKING:`, so it never runs


# --- reading imports -------------------------------------------------------------------------------------------


def read_modules(trees: Iterable[tuple[Path, str]] = SOURCE_TREES) -> list[Module]:
    """Every .py file under each folder, named as it is imported (kernels/reference.py → minipeft.kernels.reference)."""
    modules = []
    for folder, package in trees:
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            modules.append(Module(name, is_package, path.relative_to(REPO).as_posix(), path.read_text()))
    return modules


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` names, with `.` and `..` resolved against the importing file's package."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    if node.level > len(parts):
        raise ValueError(f"`{ast.unparse(node)}` reaches above the top-level package of {package!r}")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_dynamic_import(node: ast.AST) -> bool:
    """`importlib.import_module(...)`, `import_module(...)` or `__import__(...)`: an import the parser cannot see."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id in ("import_module", "__import__")) or (
        isinstance(f, ast.Attribute) and f.attr == "import_module")


def imports_in(module: Module, known: set[str]) -> list[Import]:
    """Every import in one file, top level and inside functions, each mapped to the module it names.

    `from P import n` names the module P.n when P.n is one of `known` (a submodule), otherwise P (n is an
    attribute of P). A dynamic import names its string argument; when the argument is not a literal, it names
    every string constant of the file that is a known module (how inject.py keeps a table of module names),
    or "?" when there is none.
    """
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    tree = ast.parse(module.source, filename=module.path)
    constants = sorted({n.value for n in ast.walk(tree)
                        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in known})
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif _is_dynamic_import(node):
            arg = node.args[0] if node.args else None
            literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            targets = [arg.value] if literal else (constants or ["?"])
        else:
            targets = []
        for target in dict.fromkeys(targets):  # one edge per module named, in order
            found.append(Import(target, node.lineno, ast.unparse(node), in_function, type_checking))
        for field, value in ast.iter_fields(node):
            # A function's body runs when it is called; its decorators and defaults run at import.
            inner = in_function or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                                    and field == "body")
            guarded = type_checking or (isinstance(node, ast.If) and field == "body" and _is_type_checking(node.test))
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child, inner, guarded)

    visit(tree, False, False)
    return found


def owner(target: str, known: set[str]) -> str | None:
    """The longest prefix of `target` that is a known module ("minipeft.tuners.io.save" → "minipeft.tuners.io")."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


# --- the graph and its cycles -------------------------------------------------------------------------------------


def import_graph(modules: list[Module]) -> dict[str, dict[str, list[str]]]:
    """{importer: {imported: ["file:line import", ...]}} over the given modules, imports in functions included.

    Importing a child module runs its parent package's __init__ first; that implicit step is not an edge. An
    import of a package is an edge to its __init__ only, and the __init__'s own imports continue from there.
    A module importing from a package that contains it (`from minipeft.tuners import X` inside
    minipeft/tuners/) is dropped: that is the back half of an __init__ re-exporting its children, which
    works once the __init__ has bound X, and would otherwise make every re-exporting package a cycle.
    Imports under `if TYPE_CHECKING:` never run and are not edges.
    """
    known = {m.name for m in modules}
    graph: dict[str, dict[str, list[str]]] = {m.name: {} for m in modules}
    for m in modules:
        for imp in imports_in(m, known):
            target = owner(imp.target, known)
            if target is None or imp.type_checking or m.name.startswith(target + "."):
                continue
            where = "  (in a function)" if imp.in_function else ""
            graph[m.name].setdefault(target, []).append(f"{m.path}:{imp.line} {imp.text}{where}")
    return graph


def find_cycles(graph: dict[str, dict[str, list[str]]], limit: int = MAX_CYCLES) -> list[list[str]]:
    """The elementary cycles, each once, as [a, b, ..., a], starting from its alphabetically first module.

    For each start s, a depth-first search walks only modules after s that can still lead back to s, so a
    cycle is found once, from its smallest member (Johnson's idea without the bookkeeping; the graph is small).
    """
    cycles: list[list[str]] = []
    for start in sorted(graph):
        allowed = {n for n in graph if n >= start}
        reaches_start = {start}  # modules (>= start) with a path to start
        frontier = [start]
        while frontier:
            node = frontier.pop()
            for n in allowed - reaches_start:
                if node in graph[n]:
                    reaches_start.add(n)
                    frontier.append(n)

        _walk([start], graph, reaches_start, cycles, limit)
    return cycles


def _walk(path: list[str], graph: dict[str, dict[str, list[str]]], reaches_start: set[str],
          cycles: list[list[str]], limit: int) -> None:
    """Extend `path` (which starts at its cycle's first module) by every edge that can still close the cycle."""
    for nxt in sorted(graph[path[-1]]):
        if len(cycles) >= limit:
            return
        if nxt == path[0]:
            cycles.append(path + [nxt])
        elif nxt in reaches_start and nxt not in path:
            _walk(path + [nxt], graph, reaches_start, cycles, limit)


def describe_cycles(cycles: list[list[str]], graph: dict[str, dict[str, list[str]]]) -> str:
    lines = []
    for cycle in cycles:
        lines.append("  " + " -> ".join(cycle))
        for a, b in zip(cycle[:-1], cycle[1:], strict=True):
            lines += [f"      {site}" for site in graph[a][b]]
    return "\n".join(lines)


# --- the two other rules ------------------------------------------------------------------------------------------


def function_level_imports(modules: list[Module], root: str = "minipeft") -> list[str]:
    """Each import of a `root` module made inside a function, as "file:line import" (a dynamic import counts
    when it may name a `root` module, or when the parser cannot tell what it names)."""
    known = {m.name for m in modules}
    offenders: dict[str, list[str]] = {}  # "file:line import" -> the modules a dynamic import may name
    for m in modules:
        for imp in imports_in(m, known):
            if imp.in_function and (imp.target == "?" or imp.target.split(".")[0] == root):
                offenders.setdefault(f"{m.path}:{imp.line} {imp.text}", []).append(imp.target)
    return [site if site.split(" ", 1)[1].startswith(("import ", "from ")) else f"{site}  (dynamic: {', '.join(names)})"
            for site, names in offenders.items()]


def forbidden_kernel_imports(modules: list[Module], package: str = "minipeft.kernels") -> list[str]:
    """Each import in `package` of anything but torch, triton, the standard library and `package` itself, as
    "file:line import"."""
    known = {m.name for m in modules}
    offenders = []
    for m in modules:
        if not (m.name == package or m.name.startswith(package + ".")):
            continue
        for imp in imports_in(m, known):
            top = imp.target.split(".")[0]
            own = imp.target == package or imp.target.startswith(package + ".")
            if not (own or top in KERNELS_MAY_IMPORT or top in sys.stdlib_module_names):
                offenders.append(f"{m.path}:{imp.line} {imp.text}")
    return offenders


# --- self-tests: each checker fails on a known-bad input ---------------------------------------------------------


def _synthetic(files: dict[str, str]) -> list[Module]:
    """Modules from {"pkg/__init__.py": source, "pkg/a.py": source, ...}."""
    modules = []
    for path, source in files.items():
        parts = path.removesuffix(".py").split("/")
        is_package = parts[-1] == "__init__"
        modules.append(Module(".".join(parts[:-1] if is_package else parts), is_package, path, source))
    return modules


def test_import_reader_resolves_every_kind_of_import():
    known = {"minipeft", "minipeft.model", "minipeft.data", "minipeft.quant", "minipeft.quant.nf4",
             "minipeft.quant.linear", "minipeft.tuners", "minipeft.tuners.inject", "minipeft.tuners.prompt",
             "minipeft.kernels", "minipeft.kernels.reference"}
    source = (
        "import numpy\n"
        "from .nf4 import quantize_nf4\n"                     # 2
        "from . import nf4\n"                                 # 3
        "from .. import model\n"                              # 4
        "import minipeft.tuners.inject as inj\n"              # 5
        "from minipeft.tuners import LoraConfig, inject\n"    # 6
        "from minipeft import kernels\n"                      # 7
        "if TYPE_CHECKING:\n    from minipeft.data import Task\n"  # 9
        "try:\n    from minipeft.model import GPT\nexcept ImportError:\n    pass\n"  # 11
        "class C:\n    from minipeft.data import TASKS\n"     # 15
        "    def f(self):\n        from minipeft.data import load_task\n"  # 17
        "def g(name='minipeft.tuners.prompt'):\n"
        "    importlib.import_module(name)\n"                 # 19
        "    __import__('json')\n"                            # 20
    )
    got = [(i.target, i.line, i.in_function, i.type_checking)
           for i in imports_in(Module("minipeft.quant.linear", False, "linear.py", source), known)]
    assert got == [
        ("numpy", 1, False, False),
        ("minipeft.quant.nf4", 2, False, False),
        ("minipeft.quant.nf4", 3, False, False),
        ("minipeft.model", 4, False, False),
        ("minipeft.tuners.inject", 5, False, False),
        ("minipeft.tuners", 6, False, False), ("minipeft.tuners.inject", 6, False, False),
        ("minipeft.kernels", 7, False, False),
        ("minipeft.data", 9, False, True),
        ("minipeft.model", 11, False, False),
        ("minipeft.data", 15, False, False),
        ("minipeft.data", 17, True, False),
        ("minipeft.tuners.prompt", 19, True, False),
        ("json", 20, True, False),
    ]
    # in a package's __init__, "." is the package itself
    init = Module("minipeft.kernels", True, "kernels/__init__.py", "from . import reference\nfrom .reference import f")
    assert [i.target for i in imports_in(init, known)] == ["minipeft.kernels.reference"] * 2


def test_cycle_finder_finds_a_cycle_and_ignores_a_package_re_exporting_its_children():
    modules = _synthetic({
        "pkg/__init__.py": "from pkg.a import f\nfrom pkg.b import g\n",
        "pkg/a.py": "from pkg import g\n",                    # back half of a re-export: not a cycle
        "pkg/b.py": "def h():\n    from pkg.c import x\n",    # hidden in a function: still an edge
        "pkg/c.py": "from . import b\n",
        "app.py": "from pkg import f\n",
    })
    graph = import_graph(modules)
    assert "pkg" not in graph["pkg.a"]
    assert find_cycles(graph) == [["pkg.b", "pkg.c", "pkg.b"]]
    assert describe_cycles(find_cycles(graph), graph) == (
        "  pkg.b -> pkg.c -> pkg.b\n"
        "      pkg/b.py:2 from pkg.c import x  (in a function)\n"
        "      pkg/c.py:1 from . import b")
    # a module outside a package that its __init__ leads back to is a real cycle: app -> pkg -> pkg.a -> app
    modules[1] = modules[1]._replace(source="import app\n")
    assert find_cycles(import_graph(modules)) == [["app", "pkg", "pkg.a", "app"], ["pkg.b", "pkg.c", "pkg.b"]]


def test_function_level_and_kernel_checkers_flag_what_they_should():
    modules = _synthetic({
        "minipeft/__init__.py": "",
        "minipeft/io.py": "import json\nfrom minipeft import model\n"
                          "def f():\n    import matplotlib\n    from minipeft.model import GPT\n"
                          "    importlib.import_module(NAME)\n",
        "minipeft/model.py": "",
        "minipeft/kernels/__init__.py": "import os, torch, triton.language\nfrom . import ref\nimport numpy\n"
                                        "def f():\n    from minipeft.model import GPT\n",
        "minipeft/kernels/ref.py": "from __future__ import annotations\nfrom minipeft.kernels import ref\n",
    })
    assert function_level_imports(modules) == [
        "minipeft/io.py:5 from minipeft.model import GPT",
        "minipeft/io.py:6 importlib.import_module(NAME)  (dynamic: ?)",
        "minipeft/kernels/__init__.py:5 from minipeft.model import GPT",
    ]
    assert forbidden_kernel_imports(modules) == [
        "minipeft/kernels/__init__.py:3 import numpy",
        "minipeft/kernels/__init__.py:5 from minipeft.model import GPT",
    ]


# --- the rules, on the repository -------------------------------------------------------------------------------


def test_minipeft_modules_import_each_other_without_cycles():
    graph = import_graph(read_modules())
    cycles = find_cycles(graph)
    more = " (and perhaps more)" if len(cycles) >= MAX_CYCLES else ""
    assert not cycles, (f"{len(cycles)} import cycles{more}; each edge is listed with the import that makes it:\n"
                        + describe_cycles(cycles, graph))


def test_minipeft_modules_import_minipeft_only_at_the_top_of_the_file():
    offenders = function_level_imports(read_modules())
    assert not offenders, (
        f"{len(offenders)} imports of minipeft modules inside functions; move each to the top of its file "
        "(optional third-party packages may stay inside functions):\n  " + "\n  ".join(offenders))


def test_kernels_import_only_torch_triton_and_the_standard_library():
    modules = read_modules()
    assert any(m.path == "kernels/__init__.py" for m in modules)
    offenders = forbidden_kernel_imports(modules)
    assert not offenders, ("kernels/ may import torch, triton, the standard library and its own modules only:\n  "
                           + "\n  ".join(offenders))


# --- the import name of kernels/, in fresh interpreters ----------------------------------------------------------


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter of this venv: no PYTHONPATH, so only the installed minipeft is found
    (and, from the repository root, the source folders next to the cwd, as `python -m minipeft.cli` sees them)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TRITON_INTERPRET") if k in os.environ}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def _last_json(proc: subprocess.CompletedProcess[str]):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _in_repo_kernels(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to((REPO / "kernels").resolve())


def test_minipeft_kernels_imports_from_outside_the_repo(tmp_path):
    got = _last_json(_python(
        "import json, minipeft, minipeft.kernels as k\n"
        "print(json.dumps({'name': k.__name__, 'file': k.__file__}))", tmp_path))
    assert got["name"] == "minipeft.kernels"
    assert _in_repo_kernels(got["file"]), f"minipeft.kernels comes from {got['file']}, not {REPO / 'kernels'}"


def test_no_top_level_kernels_package_points_into_the_repo(tmp_path):
    got = _last_json(_python(
        "import importlib.util, json\n"
        "s = importlib.util.find_spec('kernels')\n"
        "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))",
        tmp_path))
    if got is not None:  # Hugging Face's kernels may be installed; ours must not be
        origin, locations = got
        assert not _in_repo_kernels(origin) and not any(_in_repo_kernels(p) for p in locations), (
            f"`import kernels` finds the repo's kernels/ (origin {origin}, search path {locations}): "
            "installing minipeft put a top-level `kernels` package in site-packages")


def test_import_minipeft_does_not_import_a_top_level_kernels(tmp_path):
    got = _last_json(_python(
        "import json, sys, minipeft\n"
        "print(json.dumps(sorted(n for n in sys.modules if n == 'kernels' or n.startswith('kernels.'))))",
        tmp_path))
    assert got == [], f"import minipeft put {got} in sys.modules"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("first", ["", "import minipeft\n"], ids=["alone", "after_minipeft"])
def test_bitsandbytes_finds_no_kernels_without_get_kernel(tmp_path, first):
    # bitsandbytes runs `from kernels import get_kernel` (on CPUs with AVX512-BF16, and on MPS) and logs the
    # failure; the last lines ask the same question directly, so the test means the same on every CPU.
    proc = _python(
        "import logging, sys, warnings\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
        "logging.captureWarnings(True)\n"
        "warnings.simplefilter('always')\n"
        + first +
        "import bitsandbytes\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError as e:\n"
        "    print('from kernels import get_kernel:', e, file=sys.stderr)\n", tmp_path)
    output = proc.stdout + proc.stderr
    assert "cannot import name 'get_kernel'" not in output, output


def test_from_the_repo_root_kernels_is_still_minipeft_kernels():
    got = _last_json(_python(
        "import json, sys, minipeft\n"
        "from minipeft import kernels\n"
        "print(json.dumps({'name': kernels.__name__, 'file': kernels.__file__,\n"
        "                  'top': sorted(n for n in sys.modules if n == 'kernels' or n.startswith('kernels.'))}))",
        REPO))
    assert got["name"] == "minipeft.kernels"
    assert Path(got["file"]).resolve() == (REPO / "kernels" / "__init__.py").resolve(), got["file"]
    assert got["top"] == [], f"from the repo root, import minipeft put {got['top']} in sys.modules"
