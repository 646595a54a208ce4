"""The ```python examples in docs/client.md run against a live server."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.client_support import ROOT, shared_server

DOC = ROOT / "docs" / "client.md"
PLACEHOLDER = "127.0.0.1:50051"


def _examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


def test_docs_have_examples_for_every_section():
    examples = _examples()
    assert len(examples) >= 10
    joined = "\n".join(examples)
    for name in (
        "client.models()",
        ".step(",
        ".feed(",
        ".generate(",
        ".classify(",
        "client.stream(",
        "AsyncClient",
        "client.attach(",
        "PositionMismatch",
        "Utf8StreamDecoder",
    ):
        assert name in joined, name


@pytest.mark.parametrize("index", range(len(_examples())))
def test_docs_example_runs(server, index, tmp_path):
    code = _examples()[index].replace(PLACEHOLDER, server.target)
    script = tmp_path / f"example_{index}.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "", "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, f"example {index} failed:\n{code}\n--- stderr ---\n{proc.stderr}"
    assert proc.stdout.strip(), f"example {index} printed nothing"
