"""The rules of the house, checked from the source (docs/architecture.md, "Rules of the house").

Every ``import`` in ``mpo_core/``, ``mpobert/`` and ``benchmarks/`` is read with :mod:`ast` (also
the ones inside functions) and checked against:

- imports run one way: ``benchmarks -> mpobert -> mpo_core``; inside ``mpo_core`` the kernels
  import no ``ops``/``contract``/``nn`` (kernels hold no policy), ``ops`` imports no ``contract``
  or ``nn``, and the runtime never imports the GPU tooling (``mpo_core.gpu``);
- no two modules import each other (no import cycle of any length);
- no private name crosses a module: ``from a import _x`` or ``a._x`` with ``_x`` defined in
  another module, and a private module (``pkg._m``) is imported only from inside ``pkg``.

The checker is tested on small synthetic trees first, so a broken checker cannot pass silently.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mpo_core", "mpobert", "benchmarks")

# (importer prefix, forbidden imported prefix, why)
FORBIDDEN = (
    ("mpo_core", "mpobert", "mpo_core never imports mpobert"),
    ("mpo_core", "benchmarks", "the library never imports its benchmarks"),
    ("mpobert", "benchmarks", "the library never imports its benchmarks"),
    ("mpo_core.kernels", "mpo_core.ops", "kernels hold no policy: they never import ops"),
    ("mpo_core.kernels", "mpo_core.contract", "kernels never import the contraction planner"),
    ("mpo_core.kernels", "mpo_core.nn", "kernels never import nn modules"),
    ("mpo_core.ops", "mpo_core.contract", "ops never import the contraction planner"),
    ("mpo_core.ops", "mpo_core.nn", "ops never import nn modules"),
    ("mpo_core.nn.linear", "mpo_core.nn.surgery", "the layer never imports the model surgery built on it"),
    ("mpo_core.nn.dense", "mpo_core.nn.linear", "what a dense linear module is does not depend on the MPO layer"),
)
# Runtime modules may not import the GPU tooling; the tooling (and the acceptance check) may.
TOOLING = "mpo_core.gpu"
TOOLING_USERS = ("mpo_core.gpu", "mpo_core.check")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the file
    target: str  # dotted module imported (resolved to a module that exists in the tree)
    names: tuple[str, ...]  # names taken from it (``from target import a, b``)
    line: int


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    """The syntax tree of one source file (read once: both the import and the attribute checks walk it)."""
    return ast.parse(path.read_text(), filename=str(path))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            modules[module_name(path, root)] = path
    return modules


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def read_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import between modules of the tree (module-level and in-function)."""
    found = []
    for name, path in modules.items():
        tree = parse(path)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        found.append(Import(name, alias.name, (), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = _resolve_relative(name, is_package, node.level, node.module)
                plain = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:  # ``from pkg import submodule``
                        found.append(Import(name, sub, (), node.lineno))
                    else:
                        plain.append(alias.name)
                if plain and base in modules:
                    found.append(Import(name, base, tuple(plain), node.lineno))
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def direction_violations(imports: list[Import]) -> list[str]:
    out = []
    for imp in imports:
        for src, dst, why in FORBIDDEN:
            if _within(imp.importer, src) and _within(imp.target, dst):
                out.append(f"{imp.importer}:{imp.line} imports {imp.target}: {why}")
        if (_within(imp.target, TOOLING) and _within(imp.importer, "mpo_core")
                and not any(_within(imp.importer, user) for user in TOOLING_USERS)):
            out.append(f"{imp.importer}:{imp.line} imports {imp.target}: the runtime never imports GPU tooling")
    return out


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.importer != imp.target:
            graph.setdefault(imp.importer, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_violations(imports: list[Import], modules: dict[str, Path]) -> list[str]:
    out = []
    for imp in imports:
        parts = imp.target.split(".")
        for depth, part in enumerate(parts):
            if _is_private(part):
                owner = ".".join(parts[:depth])  # the package the private module belongs to
                if not _within(imp.importer, owner):
                    out.append(f"{imp.importer}:{imp.line} imports private module {imp.target}")
        for name in imp.names:
            if _is_private(name) and name != "_C":
                out.append(f"{imp.importer}:{imp.line} imports private name {name} from {imp.target}")
    # ``alias._name`` where alias is a module imported from the tree
    for name, path in modules.items():
        tree = parse(path)
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = _resolve_relative(name, is_package, node.level, node.module)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _is_private(node.attr)
                    and aliases[node.value.id] != name):
                out.append(f"{name}:{node.lineno} uses private name {node.attr} of {aliases[node.value.id]}")
    return out


def check_tree(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    modules = find_modules(root, packages)
    imports = read_imports(modules)
    problems = direction_violations(imports) + private_violations(imports, modules)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(imports)]
    return problems


# --- the checker on synthetic trees: each rule must fire -------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


def test_checker_accepts_a_clean_tree(tmp_path):
    root = _tree(tmp_path, {
        "mpo_core/shapes.py": "def factorize(): pass\n",
        "mpo_core/ops/__init__.py": "from mpo_core.ops import norm\n",
        "mpo_core/ops/_checks.py": "def check(): pass\n",
        "mpo_core/ops/norm.py": "from mpo_core.ops._checks import check\nfrom mpo_core.shapes import factorize\n",
        "mpobert/model.py": "from mpo_core.shapes import factorize\n",
        "benchmarks/bench.py": "import mpobert.model\n",
    })
    assert check_tree(root) == []


@pytest.mark.parametrize("files, expected", [
    ({"mpo_core/x.py": "import mpobert.model\n", "mpobert/model.py": ""}, "mpo_core never imports mpobert"),
    ({"mpo_core/kernels/k.py": "def f():\n    from mpo_core.ops.norm import g\n", "mpo_core/ops/norm.py": "g = 1\n"},
     "kernels hold no policy"),
    ({"mpo_core/ops/norm.py": "from mpo_core.contract import plan\n", "mpo_core/contract/plan.py": ""},
     "ops never import the contraction planner"),
    ({"mpo_core/nn.py": "from mpo_core.gpu.roofline import x\n", "mpo_core/gpu/roofline.py": "x = 1\n"},
     "the runtime never imports GPU tooling"),
    ({"mpo_core/a.py": "from mpo_core import b\n", "mpo_core/b.py": "def f():\n    import mpo_core.a\n"},
     "import cycle: mpo_core.a <-> mpo_core.b"),
    ({"mpo_core/a.py": "from mpo_core.b import c\n", "mpo_core/b.py": "from mpo_core.c import x\n",
      "mpo_core/c.py": "from mpo_core.a import y\n"}, "import cycle: mpo_core.a <-> mpo_core.b <-> mpo_core.c"),
    ({"mpo_core/a.py": "from mpo_core.b import _helper\n", "mpo_core/b.py": "def _helper(): pass\n"},
     "imports private name _helper from mpo_core.b"),
    ({"mpo_core/contract/f.py": "from mpo_core.ops import _dispatch\n", "mpo_core/ops/_dispatch.py": ""},
     "imports private module mpo_core.ops._dispatch"),
    ({"mpo_core/a.py": "from mpo_core import b\nb._helper()\n", "mpo_core/b.py": "def _helper(): pass\n"},
     "uses private name _helper of mpo_core.b"),
])
def test_checker_catches_each_rule(tmp_path, files, expected):
    problems = check_tree(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


# --- the real tree ---------------------------------------------------------------------------

def test_the_house_keeps_its_rules():
    problems = check_tree(ROOT)
    assert problems == [], "\n".join(problems)


# --- rule 6: files are written atomically -------------------------------------------------------

# (file, a piece of the call) that may write directly, and why
DIRECT_WRITES = {
    ("mpo_core/io.py", "torch.save(obj, fh)"): "the atomic writer itself",
    ("mpobert/model.py", "torch.save(payload, buf)"): "into an in-memory buffer, then atomic_write",
    ("mpo_core/gpu/nvcc.py", "src.write_text"): "scratch file in a TemporaryDirectory",
    ("mpo_core/gpu/aot.py", "open(path, 'wb')"): "scratch file in a TemporaryDirectory",
    ("benchmarks/decompose_speed.py", "/proc/self/clear_refs"): "a kernel interface, not a file",
    ("mpo_core/check/cli.py", "Path(args.json).write_text"): "to convert: results/check.json (issue 21)",
}


def direct_writes(root: Path) -> list[tuple[str, int, str]]:
    """Calls that write a file without :mod:`mpo_core.io`: ``open`` with a ``w``/``x`` mode,
    ``Path.write_text``/``write_bytes``, ``torch.save``, ``json.dump``."""
    found = []
    for package in (*PACKAGES, "examples"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(parse(path)):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                writes = (name == "open" and isinstance(mode, ast.Constant) and isinstance(mode.value, str)
                          and any(c in mode.value for c in "wx"))
                if writes or name in ("write_text", "write_bytes") or ast.unparse(func) in ("torch.save", "json.dump"):
                    found.append((path.relative_to(root).as_posix(), node.lineno, ast.unparse(node)))
    return found


def test_checker_finds_direct_writes(tmp_path):
    root = _tree(tmp_path, {"mpobert/w.py": "import json, torch\nopen('a', 'w')\nopen('b')\njson.dump(1, f)\n"
                                            "torch.save(x, 'c')\nPath('d').write_text('')\n"})
    assert [line for _, line, _ in direct_writes(root)] == [2, 4, 5, 6]


def test_files_are_written_atomically():
    found = [(f, line, call) for f, line, call in direct_writes(ROOT)
             if not any(f == file and piece in call for file, piece in DIRECT_WRITES)]
    assert found == [], "write through mpo_core.io.atomic_write / atomic_torch_save:\n" + "\n".join(map(str, found))


# --- no module over 500 lines (issue 21) ---------------------------------------------------------

MAX_LINES = 500
# files still over the limit, to be split by their owners; the list may only shrink
OVER_LIMIT: set[str] = set()


def test_no_module_over_500_lines():
    long = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
            for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    over = {f: n for f, n in long.items() if n > MAX_LINES and f not in OVER_LIMIT}
    assert over == {}, f"modules over {MAX_LINES} lines (split them): {over}"
