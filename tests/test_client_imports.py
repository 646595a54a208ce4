"""The client works on a plain install: no torch, no onnxruntime, nothing from the server or export."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.client_support import ROOT, shared_server

# A meta-path finder that makes the heavy packages unimportable, then exercises the client.
BLOCKED_RUN = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = ("torch", "onnxruntime", "onnx", "seqserve.server", "seqserve.export", "sklearn", "matplotlib")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    import seqserve.client, seqserve.cli
    from seqserve.client import Client
    from seqserve.client import cli as client_cli  # noqa: F401
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "onnx"))
    assert not loaded, loaded
    argv = sys.argv[1:]
    if argv[0] == "--help":
        raise SystemExit(seqserve.cli.main(["client", "--help"]))
    with Client(argv[0]) as c, c.session("lm-lstm") as s:
        text = "".join(s.generate("hi", max_tokens=5, seed=1))
        print(len(c.models()), s.position)
    raise SystemExit(seqserve.cli.main(["client", "--target", argv[0], "models"]))
""")


def _run_blocked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_client_help_without_torch_or_onnxruntime():
    proc = _run_blocked("--help")
    assert proc.returncode == 0, proc.stderr
    assert "seqserve client" in proc.stdout and "generate" in proc.stdout and "Exit codes" in proc.stdout


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


def test_client_talks_to_a_server_without_torch_or_onnxruntime(server):
    proc = _run_blocked(server.target)
    assert proc.returncode == 0, proc.stderr
    first, *table = proc.stdout.splitlines()
    assert first == "5 7"
    assert table[0].startswith("NAME") and any(row.startswith("lm-lstm") for row in table)


def test_sdk_modules_import_nothing_heavy():
    """Static check: no client module names torch, onnxruntime or the server/export packages."""
    forbidden = ("import torch", "onnxruntime", "seqserve.server", "seqserve.export", "from torch")
    for path in (ROOT / "client").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not [f for f in forbidden if f in text], path.name
