"""Static checks of dogestry.py: the type checker finds nothing, only the standard library is imported,
and the modules imported lazily (for start-up time) are imported wherever code uses them."""

import ast
import importlib.util
import subprocess
import sys

from conftest import skip_or_fail
from realdocker import DOGESTRY


def test_mypy_finds_no_errors(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        skip_or_fail("mypy is not installed (python3 -m pip install mypy)")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), str(DOGESTRY)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout


def test_only_the_standard_library_is_imported():
    tree = ast.parse(DOGESTRY.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    assert modules and modules <= set(sys.stdlib_module_names), sorted(modules - set(sys.stdlib_module_names))


def _type_checking_imports(tree):
    """Names the module imports only for the type checker (under `if TYPE_CHECKING:`)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    names.update((alias.asname or alias.name).split(".")[0] for alias in stmt.names)
    return names


def _imported_names(function):
    """Names the function's own body (not a nested function's) binds by import statements."""
    names, todo = set(), list(function.body) if isinstance(function.body, list) else [function.body]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return names


def _runtime_uses(node, lazy, functions, found):
    """(line, name) of every use of a LAZY name outside annotations that no enclosing function
    imports (or binds as a parameter)."""
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return
    if isinstance(node, ast.Name) and node.id in lazy and not any(node.id in names for names in functions):
        found.append((node.lineno, node.id))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = node.args
        for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
            _runtime_uses(default, lazy, functions, found)
        for decorator in getattr(node, "decorator_list", ()):
            _runtime_uses(decorator, lazy, functions, found)
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg] if a]
        local = _imported_names(node) | set(params)
        for stmt in node.body if isinstance(node.body, list) else [node.body]:
            _runtime_uses(stmt, lazy, functions + [local], found)
        return
    if isinstance(node, ast.AnnAssign):  # its annotation is never evaluated
        for part in (node.target, node.value):
            if part is not None:
                _runtime_uses(part, lazy, functions, found)
        return
    for child in ast.iter_child_nodes(node):
        _runtime_uses(child, lazy, functions, found)


def test_modules_imported_for_the_type_checker_only_are_imported_where_code_runs_them():
    """A module dogestry loads lazily (for a fast start) is imported at module level only under
    `if TYPE_CHECKING:`, where mypy takes it as imported everywhere; every use outside an
    annotation must sit in a function that imports it, or mypy would pass a NameError."""
    tree = ast.parse(DOGESTRY.read_text())
    # annotations are left unevaluated only with this, so they may name those modules' types
    assert any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and [a.name for a in node.names] == ["annotations"] for node in tree.body)
    lazy = _type_checking_imports(tree)
    found = []
    _runtime_uses(tree, lazy, [], found)
    assert lazy and found == []
