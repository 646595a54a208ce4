#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC modules from proto/. Run after editing a .proto file;
# tests/test_proto.py fails while the committed modules are stale. Use the grpcio-tools version
# pinned in pyproject's dev extras: its code must load on every protobuf the project allows.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-proto}"
python -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/seqserve/v1/*.proto proto/seqserve/kserve/*.proto
