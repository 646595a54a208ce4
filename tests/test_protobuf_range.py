"""seqserve and tritonclient[grpc] share one environment: the protobuf installed here satisfies both,
the generated code loads on every protobuf seqserve admits, and pip resolves the server with
tritonclient (docs/triton-compat.md, "One environment with tritonclient")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(name: str, requirements: list[str], extra: str = "") -> SpecifierSet:
    """The version range ``requirements`` (as in package metadata) give package ``name``."""
    found = SpecifierSet()
    for text in requirements:
        req = Requirement(text)
        if req.name.lower() == name and (req.marker is None or req.marker.evaluate({"extra": extra})):
            found &= req.specifier
    return found


def lower_bound(spec: SpecifierSet) -> Version:
    [low] = [Version(s.version) for s in spec if s.operator == ">="]
    return low


def test_the_installed_protobuf_satisfies_seqserve_and_tritonclient():
    protobuf = Version(metadata.version("protobuf"))
    ours = declared("protobuf", metadata.requires("seqserve") or [])
    theirs = declared("protobuf", metadata.requires("tritonclient") or [], extra="grpc")
    assert ours and theirs, (ours, theirs)
    assert protobuf in ours and protobuf in theirs, f"protobuf {protobuf}: seqserve wants {ours}, tritonclient {theirs}"
    assert ours & theirs, "no protobuf satisfies both"


def test_generated_code_loads_on_every_protobuf_and_grpcio_seqserve_admits():
    """Generated code refuses a runtime older than the protoc that wrote it (and protobuf
    guarantees a runtime one major release newer), so the declared ranges must start no lower than
    the code's versions and end before two majors past it."""
    protobuf = declared("protobuf", PYPROJECT["dependencies"])
    grpcio = declared("grpcio", PYPROJECT["dependencies"])
    modules = sorted((ROOT / "proto").rglob("*_pb2.py"))
    assert len(modules) >= 3
    for path in modules:
        text = path.read_text()
        args = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text
        )
        assert args, path
        gencode = Version(".".join(args.groups()))
        assert gencode <= lower_bound(protobuf), f"{path.name} needs protobuf >= {gencode}; pyproject admits {protobuf}"
        assert Version(f"{gencode.major + 2}") not in protobuf, f"{path.name}: {protobuf} reaches two majors past it"
    for path in sorted((ROOT / "proto").rglob("*_pb2_grpc.py")):
        wanted = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text())
        assert wanted and Version(wanted.group(1)) <= lower_bound(grpcio), (path.name, grpcio)


@pytest.mark.timeout(240)
def test_pip_resolves_the_server_with_tritonclient(tmp_path):
    """What a user runs, asked of pip's resolver (dry run, from the package index): the server and
    tritonclient together; and the server alone lands on a protobuf tritonclient accepts, so
    installing either one after the other changes nothing the first needs."""
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = tmp_path.glob("seqserve-*.whl")
    tritonclient = declared("protobuf", metadata.requires("tritonclient") or [], extra="grpc")

    def resolve(*requirements: str) -> dict[str, str]:
        report = tmp_path / "report.json"
        proc = subprocess.run(
            [*pip, "install", "--dry-run", "--ignore-installed", "-q", "--report", str(report), *requirements],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {
            i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
        }

    together = resolve(f"{wheel}[server]", "tritonclient[grpc]")
    assert "tritonclient" in together and "seqserve" in together
    alone = resolve(f"{wheel}[server]")
    assert Version(alone["protobuf"]) in tritonclient, alone
    for name in ("grpcio-health-checking", "grpcio-reflection", "grpcio-status", "googleapis-common-protos"):
        assert alone[name] == together[name], (name, alone[name], together[name])
