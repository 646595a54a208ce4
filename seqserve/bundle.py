"""The model bundle: the one contract between export and the server.

A bundle is a folder ``<root>/<name>/<version>/`` holding ``model.onnx``, ``manifest.json`` and
the training curves. This module is the only code that reads or checks bundles; it needs only the
standard library so the server (no torch) and tools can use it.

ONNX graph contract (schema 1):
  inputs   ``tokens`` int64 [batch, seq] (input kind "tokens") or
           ``features`` float32 [batch, seq, dim] (input kind "features"),
           then one input per state tensor (``h0``, and ``c0`` for LSTM), float32 [layers, batch, hidden]
  outputs  ``logits`` float32 [batch, seq, outputs] (per-step logits),
           then one output per state tensor (``hn``, and ``cn`` for LSTM), same shape as its input
Every state tensor's batch axis is given in the manifest (``batch_axis``); ``state`` pairs each
state input with the output that carries it to the next call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
KINDS = ("lm", "classifier", "regressor")  # a regressor's logits are its raw outputs; no labels
CELLS = ("lstm", "gru", "rnn")
INPUT_KINDS = ("tokens", "features")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BundleError(Exception):
    """A bundle is missing, unreadable or does not satisfy the contract."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` entries are ints or axis names ("batch", "seq")."""

    name: str
    dtype: str  # "int64" or "float32"
    shape: list[Any]
    batch_axis: int | None = None  # set for state tensors


@dataclass(frozen=True)
class StateSpec:
    """A recurrent state tensor: read from ``input``, written to ``output``."""

    input: str
    output: str
    batch_axis: int
    shape: list[Any]  # e.g. [layers, "batch", hidden]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    kind: str  # "lm", "classifier" or "regressor"
    cell: str  # "lstm", "gru" or "rnn"
    layers: int
    hidden_size: int
    embedding_size: int | None  # None for feature inputs
    input_kind: str  # "tokens" or "features"
    input_dim: int  # vocabulary size for tokens, frame width for features
    output_size: int  # logits per step: vocabulary size (lm) or number of classes
    labels: list[str] | None  # class names (classifier) or None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StateSpec]
    opset: int
    onnx_sha256: str
    data: dict[str, Any] = field(default_factory=dict)  # what the model was trained on
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def logits_name(self) -> str:
        return self.outputs[0].name

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Manifest":
        if not isinstance(raw, dict):
            raise BundleError("manifest must be a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"unknown manifest schema_version {version!r}; this seqserve reads version {SCHEMA_VERSION}"
            )
        try:
            body = dict(raw)
            body["inputs"] = [TensorSpec(**t) for t in raw["inputs"]]
            body["outputs"] = [TensorSpec(**t) for t in raw["outputs"]]
            body["state"] = [StateSpec(**s) for s in raw["state"]]
            manifest = cls(**body)
        except KeyError as exc:
            raise BundleError(f"manifest is missing field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise BundleError(f"manifest has a malformed field: {exc}") from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check the manifest is self-consistent; raise BundleError naming the first problem."""
        problems = []
        if not _NAME_RE.match(self.name or ""):
            problems.append(f"name {self.name!r} must be 1-128 of letters, digits, '.', '_', '-'")
        if not isinstance(self.version, int) or self.version < 1:
            problems.append(f"version must be a positive integer, got {self.version!r}")
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.cell not in CELLS:
            problems.append(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.input_kind not in INPUT_KINDS:
            problems.append(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        for fname in ("layers", "hidden_size", "input_dim", "output_size"):
            value = getattr(self, fname)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{fname} must be a positive integer, got {value!r}")
        if self.kind == "classifier" and (not self.labels or len(self.labels) != self.output_size):
            problems.append("a classifier needs one label name per output")
        expected_state = 2 if self.cell == "lstm" else 1
        if len(self.state) != expected_state:
            problems.append(
                f"a {self.cell} model has {expected_state} state tensor(s), manifest lists {len(self.state)}"
            )
        in_names = [t.name for t in self.inputs]
        out_names = [t.name for t in self.outputs]
        for s in self.state:
            if s.input not in in_names or s.output not in out_names:
                problems.append(f"state {s.input}->{s.output} is not among the graph's inputs/outputs")
        if len(self.inputs) != 1 + len(self.state) or len(self.outputs) != 1 + len(self.state):
            problems.append("graph must have one data input and one logits output besides the state tensors")
        if not re.fullmatch(r"[0-9a-f]{64}", self.onnx_sha256 or ""):
            problems.append("onnx_sha256 must be 64 lowercase hex digits")
        if problems:
            raise BundleError("invalid manifest: " + "; ".join(problems))

    def state_shape(self, batch: int) -> tuple[int, ...]:
        """Concrete shape of one state tensor for ``batch`` rows."""
        spec = self.state[0]
        return tuple(batch if i == spec.batch_axis else int(d) for i, d in enumerate(spec.shape))

    def state_bytes_per_session(self) -> int:
        return sum(4 * self.layers * self.hidden_size for _ in self.state)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def sha256_file(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(path: os.PathLike | str, verify_hash: bool = True) -> Bundle:
    """Read and check one bundle folder. Raises BundleError with a message naming the problem."""
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    manifest_path = folder / MANIFEST_FILE
    model_path = folder / MODEL_FILE
    if not manifest_path.is_file():
        raise BundleError(f"bundle {folder} has no {MANIFEST_FILE}")
    if not model_path.is_file():
        raise BundleError(f"bundle {folder} has no {MODEL_FILE}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from None
    try:
        manifest = Manifest.from_dict(raw)
    except BundleError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    if verify_hash:
        actual = sha256_file(model_path)
        if actual != manifest.onnx_sha256:
            raise BundleError(
                f"{model_path} does not match its manifest (sha256 {actual[:12]}..., manifest says "
                f"{manifest.onnx_sha256[:12]}...): the file was changed or truncated; re-export the model"
            )
    if folder.name.isdigit() and int(folder.name) != manifest.version:
        raise BundleError(f"{folder}: folder says version {folder.name}, manifest says {manifest.version}")
    return Bundle(folder, manifest)


def write_manifest(folder: os.PathLike | str, manifest: Manifest) -> Path:
    manifest.validate()
    out = Path(folder) / MANIFEST_FILE
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, out)
    return out


def list_versions(root: os.PathLike | str, name: str) -> list[int]:
    model_dir = Path(root) / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(root: os.PathLike | str, name: str) -> int:
    versions = list_versions(root, name)
    return (versions[-1] + 1) if versions else 1


def discover(root: os.PathLike | str) -> dict[str, dict[int, Path]]:
    """Every ``<name>/<version>/`` folder under ``root`` that holds a manifest, without loading it."""
    found: dict[str, dict[int, Path]] = {}
    base = Path(root)
    if not base.is_dir():
        raise BundleError(f"model directory {base} does not exist")
    for model_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for version_dir in model_dir.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit() and (version_dir / MANIFEST_FILE).is_file():
                found.setdefault(model_dir.name, {})[int(version_dir.name)] = version_dir
    return found
