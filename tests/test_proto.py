"""The committed generated protobuf code matches proto/ (regenerate with scripts/gen_proto.sh)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    stale = [str(rel) for rel in generated if (ROOT / "proto" / rel).read_text() != (tmp_path / rel).read_text()]
    assert not stale, f"stale generated code, run scripts/gen_proto.sh: {stale}"


def _wire_shape() -> set[tuple]:
    """(message, field, number, type, label) of every field, enum value and method of seqserve.v1."""
    from google.protobuf import descriptor_pb2

    from seqserve.v1 import seqserve_pb2

    fd = descriptor_pb2.FileDescriptorProto()
    seqserve_pb2.DESCRIPTOR.CopyToProto(fd)
    rows = {(m.name, f.name, f.number, f.type, f.label) for m in fd.message_type for f in m.field}
    rows |= {(e.name, v.name, v.number, 0, 0) for e in fd.enum_type for v in e.value}
    rows |= {
        (s.name, m.name, 0, int(m.client_streaming), int(m.server_streaming)) for s in fd.service for m in s.method
    }
    return rows


def test_changes_to_the_released_api_are_additive():
    """Every field, enum value and method of the released seqserve.v1 is still there with the same
    number, type and cardinality (tests/data/seqserve_v1_released.json); new ones may be added."""
    import json

    released = {tuple(r) for r in json.loads((ROOT / "tests" / "data" / "seqserve_v1_released.json").read_text())}
    missing = released - _wire_shape()
    assert not missing, f"removed or changed in seqserve.v1 (a breaking change): {sorted(missing)}"


def test_the_output_spec_cache_key_holds_every_field():
    """Steps' OutputSpecs are cached by their scalar fields (server/api/convert.py): a field added
    to OutputSpec and left out of that key would make different specs share one cached answer."""
    from seqserve.server.api import convert
    from seqserve.v1 import seqserve_pb2 as pb

    fields = {f.name for f in pb.OutputSpec.DESCRIPTOR.fields}
    assert fields == set(convert.SPEC_SCALARS) | {"sample"}
    a = convert.cached_output_spec(pb.OutputSpec(top_k=3, argmax=True))
    assert (a.top_k, a.argmax, a.logits) == (3, True, False)
    assert convert.cached_output_spec(pb.OutputSpec(top_k=3)) != a
    sampled = convert.cached_output_spec(pb.OutputSpec(sample=pb.Sampling(temperature=0.5, seed=2)))
    assert sampled.sample is not None and sampled.sample.seed == 2
