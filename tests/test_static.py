"""Static checks of dogestry.py: the type checker finds nothing, and only the standard library is imported."""

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
