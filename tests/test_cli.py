"""The one `seqserve` command: every subcommand answers --help."""

import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run([sys.executable, "-m", "seqserve", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sub", ["export", "serve", "client", "bench"])
def test_subcommand_help(sub):
    proc = _run(sub, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"seqserve {sub}" in proc.stdout


def test_no_subcommand_prints_usage_and_fails():
    proc = _run()
    assert proc.returncode == 2
    assert "export" in proc.stdout and "serve" in proc.stdout


def test_installed_names_are_namespaced(tmp_path):
    # Run outside the checkout so the source folders themselves are not on sys.path.
    code = (
        "import importlib.util as u;"
        "assert u.find_spec('seqserve.server') and u.find_spec('seqserve.client') and u.find_spec('seqserve.export');"
        "bare=[m for m in ('server','client','export','bench') if u.find_spec(m)];"
        "assert not bare, bare"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
