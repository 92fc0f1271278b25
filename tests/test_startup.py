"""Start-up: the commands scripts and shell completions run most often load only the standard
library modules they use, so they answer fast (tests/bench.py times them; this guards without timing)."""

import ast
import subprocess
import sys

import pytest

from realdocker import DOGESTRY, small_save_archive

# What only the network, the server, archives, S3's XML or config files need (http.client alone
# brings email and ssl along): none of it loads before a command that needs it runs.
NOT_AT_START = ("http", "socketserver", "ssl", "socket", "email", "xml", "urllib.request", "tarfile",
                "configparser", "getpass", "hmac", "datetime")
THREADS = ("concurrent", "queue")  # thread pools: list reads a store with them, nothing before it does


def loaded_by(tmp_path, *argv):
    """(exit status, stdout, stderr, modules loaded) of `dogestry ARGV` run in a fresh python3 -S
    (no site hooks, which may load modules of their own): the modules it loaded beyond the interpreter's."""
    record = tmp_path / "modules.json"
    code = ("import sys; before = set(sys.modules); sys.path.insert(0, %r); import dogestry; "
            "status = dogestry.main(%r); loaded = sorted(set(sys.modules) - before); "
            "open(%r, 'w').write(repr(loaded)); sys.exit(status)" % (str(DOGESTRY.parent), list(argv), str(record)))
    proc = subprocess.run([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert record.exists(), proc.stderr
    return proc.returncode, proc.stdout, proc.stderr, ast.literal_eval(record.read_text())


def among(modules, families):
    """The modules that are one of FAMILIES or inside one (email.utils is of email)."""
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in families))


def small_store(tmp_path):
    """A directory store holding one small image, small/app:1, imported from a docker save archive."""
    archive, store = small_save_archive(tmp_path / "small.tar"), tmp_path / "store"
    proc = subprocess.run([sys.executable, str(DOGESTRY), "import", "-q", str(store), str(archive)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    return store


@pytest.mark.parametrize("argv, status, says", [
    (["version"], 0, "dogestry version"),
    (["--version"], 0, "dogestry version"),
    (["help"], 0, "usage: dogestry"),
    (["help", "push"], 0, "usage: dogestry push"),
    (["push"], 2, "dogestry: error:"),
    (["no-such-command"], 2, "dogestry: error:"),
], ids=["version", "--version", "help", "help push", "usage error", "unknown command"])
def test_version_help_and_usage_errors_load_no_network_server_archive_or_thread_pool_modules(
        tmp_path, argv, status, says):
    code, out, err, modules = loaded_by(tmp_path, *argv)
    assert code == status, out + err
    assert says in out + err
    assert among(modules, NOT_AT_START + THREADS) == []
    assert "dogestry" in modules and "argparse" in modules  # the measurement saw the import


def test_listing_a_directory_store_loads_no_network_server_or_archive_modules(tmp_path):
    store = small_store(tmp_path)
    code, out, err, modules = loaded_by(tmp_path, "list", str(store))
    assert (code, err) == (0, "")
    assert "small/app" in out and "1" in out.split()
    assert among(modules, NOT_AT_START) == []
