"""How tests/test_architecture.py reads the code: files, imports, attribute accesses, definitions.

Everything here is static (the `ast` module over source text). Nothing imports vLLM or
MorphServe, so the architecture test runs in a second or two with no engine and no model.
The rules themselves (which room may import what, which names are vLLM internals) live in
tests/test_architecture.py; this module only answers questions such as "which modules does
this file import, and on which line?".
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Calls that import the module named by their first argument.
_IMPORT_CALLS = frozenset({"import_module", "__import__"})
# Calls whose second argument names an attribute: getattr(obj, "name"), setattr(...), ...
_ATTR_CALLS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


# --- files ----------------------------------------------------------------------------------

def python_files(*roots: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Repo-relative posix paths of the .py files under `roots` (folders or files), sorted.

    A path under any of `exclude` (folders or files, repo-relative) is left out.
    """
    found: set[str] = set()
    for root in roots:
        base = REPO / root
        paths = [base] if base.is_file() else base.rglob("*.py")
        for path in paths:
            rel = path.relative_to(REPO).as_posix()
            if "__pycache__" in rel or any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude):
                continue
            found.add(rel)
    return sorted(found)


@lru_cache(maxsize=None)
def parse(path: str | Path) -> ast.Module:
    """The syntax tree of one file (repo-relative, or absolute for vLLM's files)."""
    path = Path(path)
    full = path if path.is_absolute() else REPO / path
    return ast.parse(full.read_bytes(), filename=str(full))


def module_name(path: str) -> str:
    """The dotted module name of a repo-relative file: morphserve/vllm/__init__.py -> morphserve.vllm."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_vllm(module: str) -> bool:
    """True for vLLM's own modules (`vllm`, `vllm.v1...`), not for `morphserve.vllm`."""
    return module == "vllm" or module.startswith("vllm.")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings (of the module, a class or a function)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


@lru_cache(maxsize=None)
def embedded_code(tree: ast.Module) -> list[tuple[int, ast.Module]]:
    """Python programs written as string literals (for `python -c CODE` in a subprocess).

    A string counts as code when it is not a docstring, parses as Python, and contains an
    import statement: prose almost never parses. (A one-line message that is itself an import,
    such as "import vllm.x", does count; that is why the architecture test skips its own files.)
    Returns (line offset, tree) pairs; a line in the tree plus the offset is the line in the file.
    """
    docstrings = _docstring_nodes(tree)
    programs = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        if "import" not in node.value:
            continue
        try:
            inner = ast.parse(node.value)
        except (SyntaxError, ValueError):
            continue
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(inner)):
            # A triple-quoted string starting with a newline: its line 2 is the literal's line + 1.
            programs.append((node.lineno - 1, inner))
    return programs


# --- imports --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    """One import: `module` is absolute; `names` are the `from module import ...` names
    (empty for `import module` and for import_module("module"))."""

    line: int
    module: str
    names: tuple[str, ...] = ()
    alias: str | None = None  # what `import module [as alias]` binds, for plain `import`

    def describe(self) -> str:
        if self.names:
            return f"from {self.module} import {', '.join(self.names)}"
        return f"import {self.module}"


def _resolve_relative(path: str, level: int, module: str | None) -> str:
    package = module_name(path).split(".")
    if not path.endswith("__init__.py"):
        package = package[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join(base + ([module] if module else []))


def _imports_in(tree: ast.Module, path: str, line_offset: int) -> list[Import]:
    found = []
    for node in ast.walk(tree):
        line = node.lineno + line_offset if hasattr(node, "lineno") else 0
        if isinstance(node, ast.Import):
            for a in node.names:
                found.append(Import(line, a.name, alias=a.asname or a.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = _resolve_relative(path, node.level, node.module)
            found.append(Import(line, module, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Call) and _call_name(node) in _IMPORT_CALLS and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append(Import(line, node.args[0].value))
    return found


def imports(path: str) -> list[Import]:
    """Every import in a file, at any depth (inside functions too), including
    importlib.import_module("...") / __import__("...") with a literal name and the imports of
    Python code embedded in string literals (see embedded_code)."""
    tree = parse(path)
    found = _imports_in(tree, path, 0)
    for offset, inner in embedded_code(tree):
        found += _imports_in(inner, path, offset)
    return sorted(found, key=lambda i: (i.line, i.module, i.names))


def module_attributes(path: str, alias: str) -> list[tuple[int, str]]:
    """(line, name) of every `alias.name` in a file (and in its embedded code): what a file
    that did `import vllm` reaches through the bare module."""
    tree = parse(path)
    trees = [(0, tree)] + embedded_code(tree)
    return sorted((node.lineno + offset, node.attr) for offset, t in trees for node in ast.walk(t)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == alias)


# --- attribute accesses ---------------------------------------------------------------------

def _call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


@dataclass(frozen=True)
class Access:
    """One attribute access: `obj.name`, or getattr/setattr/hasattr/delattr(obj, "name").
    `root` is the name the expression starts from (`torch` in `torch.ops._C`), when it has one."""

    line: int
    name: str
    root: str | None


def attribute_accesses(path: str) -> list[Access]:
    """Every attribute a file reads, writes or deletes by name, in code at any depth and in
    the code embedded in its string literals."""
    tree = parse(path)
    found = []
    for offset, t in [(0, tree)] + embedded_code(tree):
        for node in ast.walk(t):
            if isinstance(node, ast.Attribute):
                found.append(Access(node.lineno + offset, node.attr, _root_name(node.value)))
            elif isinstance(node, ast.Call) and _call_name(node) in _ATTR_CALLS and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                found.append(Access(node.lineno + offset, node.args[1].value, _root_name(node.args[0])))
    return found


def imported_roots(path: str) -> dict[str, str]:
    """The names a file binds by importing, and the top-level package each comes from:
    `import torch.nn as nn` -> {"nn": "torch"}, `from os import path` -> {"path": "os"}."""
    bound = {}
    for imp in imports(path):
        top = imp.module.split(".")[0]
        if imp.names:
            bound.update((n, top) for n in imp.names)
        elif imp.alias:
            bound[imp.alias] = top
    return bound


# --- definitions ----------------------------------------------------------------------------

def is_private(name: str) -> bool:
    """`_x` (and name-mangled `__x`), but not `__dunder__` and not the throwaway `_`."""
    return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))


def _bound_names(target: ast.expr) -> list[ast.expr]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _bound_names(t)]
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    return [target]


def _targets(node: ast.stmt) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return [n for t in node.targets for n in _bound_names(t)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def definitions(tree: ast.Module) -> set[str]:
    """The names a module defines for others to reach as attributes:
    - functions, methods and classes, at any depth;
    - names assigned at module level or in a class body (globals, class attributes);
    - attributes assigned on `self` / `cls` (`self._x = ...`), in any method.
    """
    names: set[str] = set()

    def visit(body: list[ast.stmt], namespace: bool) -> None:
        """`namespace`: these statements bind module or class attributes."""
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                visit(node.body, namespace=isinstance(node, ast.ClassDef))
                continue
            for target in _targets(node):
                if isinstance(target, ast.Name) and namespace:
                    names.add(target.id)
                elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                        and target.value.id in ("self", "cls"):
                    names.add(target.attr)
            for field in ("body", "orelse", "finalbody", "handlers"):  # if / for / while / try / with
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], (ast.stmt, ast.excepthandler)):
                    visit(inner if field != "handlers" else [s for h in inner for s in h.body], namespace)
            if isinstance(node, ast.Match):
                visit([s for case in node.cases for s in case.body], namespace)

    visit(tree.body, namespace=True)
    return names


# --- vLLM's installed source -----------------------------------------------------------------

@lru_cache(maxsize=None)
def vllm_package_dir() -> Path:
    """The installed vLLM package, found without importing it (find_spec of a top-level name
    only locates the package; it runs none of its code)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed in this environment"
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=None)
def vllm_public_api() -> frozenset[str]:
    """The names of `__all__` in vllm/__init__.py, read from its syntax tree."""
    for node in parse(vllm_package_dir() / "__init__.py").body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in _targets(node)):
            return frozenset(ast.literal_eval(node.value))
    raise AssertionError("vllm/__init__.py has no literal __all__")


@lru_cache(maxsize=None)
def _vllm_sources() -> tuple[tuple[Path, bytes], ...]:
    return tuple((p, p.read_bytes()) for p in sorted(vllm_package_dir().rglob("*.py")))


@lru_cache(maxsize=None)
def vllm_definers(names: frozenset[str]) -> dict[str, str]:
    """For each of `names` that vLLM's installed source defines (see `definitions`): the
    first vLLM file (relative to the package) that defines it.

    A full harvest (parse all ~2,600 files of vLLM 0.32, collect every private definition:
    ~10,000 names) takes 10-20 s on two cores, far more than this test may spend. So it is
    narrowed first: only the files whose text mentions one of `names` as a whole word are
    parsed (a substring test, then a word match, over vLLM's ~40 MB: ~0.05 s a name). The
    answer equals the full harvest restricted to `names` (checked on 300 random vLLM private
    names when this was written).
    """
    word = {n: re.compile(rb"(?<![A-Za-z0-9_])" + re.escape(n.encode()) + rb"(?![A-Za-z0-9_])") for n in names}
    found: dict[str, str] = {}
    for path, text in _vllm_sources():
        mentioned = {n for n in names - found.keys() if n.encode() in text and word[n].search(text)}
        if mentioned:
            for name in sorted(mentioned & definitions(parse(path))):
                found[name] = path.relative_to(vllm_package_dir().parent).as_posix()
    return found
