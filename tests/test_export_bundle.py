"""The bundle an export writes: manifest round trip, the checks load_bundle makes, the parity
check catching a graph that is not the model, and streaming in chunks through ONNX Runtime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from seqserve.bundle import MANIFEST_FILE, MODEL_FILE, BundleError, Manifest, load_bundle
from seqserve.export.model import ModelConfig, RecurrentModel
from seqserve.export.onnx_export import export_onnx, io_names
from seqserve.export.parity import ParityError, check_parity

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def bundle_copy(tiny_models, tmp_path):
    """A private copy of the fixture's LSTM language-model bundle, safe to tamper with."""
    root, _ = tiny_models
    target = tmp_path / "lm-lstm" / "1"
    shutil.copytree(root / "lm-lstm" / "1", target)
    return target


def test_manifest_round_trip(bundle_copy):
    bundle = load_bundle(bundle_copy)
    again = Manifest.from_dict(json.loads(bundle.manifest.to_json()))
    assert again == bundle.manifest
    assert again.state[0].input == "h0" and again.state[1].output == "cn"
    assert bundle.manifest.parity["passed"] is True


def test_missing_model_file(bundle_copy):
    (bundle_copy / MODEL_FILE).unlink()
    with pytest.raises(BundleError, match="has no model.onnx"):
        load_bundle(bundle_copy)


def test_hash_mismatch_after_editing_one_byte(bundle_copy):
    path = bundle_copy / MODEL_FILE
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="does not match its manifest"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify_hash=False)  # the manifest itself is still fine


def _edit_manifest(folder, change):
    path = folder / MANIFEST_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(json.dumps(raw), encoding="utf-8")


def test_unknown_schema_version(bundle_copy):
    _edit_manifest(bundle_copy, lambda raw: raw.update(schema_version=99))
    with pytest.raises(BundleError, match="unknown manifest schema_version 99"):
        load_bundle(bundle_copy)


def test_missing_field(bundle_copy):
    _edit_manifest(bundle_copy, lambda raw: raw.pop("hidden_size"))
    with pytest.raises(BundleError, match="hidden_size"):
        load_bundle(bundle_copy)


def test_inconsistent_field(bundle_copy):
    _edit_manifest(bundle_copy, lambda raw: raw.update(cell="gru"))  # a gru has one state tensor, not two
    with pytest.raises(BundleError, match="a gru model has 1 state tensor"):
        load_bundle(bundle_copy)


def _model(cell: str, seed: int) -> RecurrentModel:
    torch.manual_seed(seed)
    return RecurrentModel(ModelConfig(cell=cell, embedding_size=8, hidden_size=16, layers=2, dropout=0.0)).eval()


def test_parity_catches_a_graph_from_another_model(tmp_path):
    onnx_path = export_onnx(_model("lstm", seed=1), tmp_path / "model.onnx")
    check_parity(_model("lstm", seed=1), onnx_path)  # the same weights pass
    with pytest.raises(ParityError, match="differs from the model"):
        check_parity(_model("lstm", seed=2), onnx_path)
    nudged = _model("lstm", seed=1)
    with torch.no_grad():
        nudged.head.bias[3] += 1e-3  # one output, one thousandth off
    with pytest.raises(ParityError, match=r"differs from the model by 0.00\d+ \(scaled\)"):
        check_parity(nudged, onnx_path)


def test_parity_record_measures_against_float64(tmp_path):
    model = _model("gru", seed=3)
    record = check_parity(model, export_onnx(model, tmp_path / "model.onnx"))
    assert record["passed"] and record["max_onnx_error"] <= record["tolerance"] * 10
    assert [(s["batch"], s["seq"]) for s in record["shapes"]] == [(1, 1), (64, 1), (3, 257), (5, 17)]
    assert all(s["onnx_error"] <= s["bound"] for s in record["shapes"])
    assert record["chunked_vs_whole"]["passed"]


@pytest.mark.parametrize("name", ["lm-lstm", "lm-gru", "lm-rnn"])
def test_onnx_chunked_equals_whole(tiny_models, name):
    """Feeding a sequence to ONNX Runtime in uneven chunks, carrying the state, gives the same
    logits and final state as one call over the whole sequence."""
    import onnxruntime as ort

    root, models = tiny_models
    bundle = load_bundle(root / name / "1")
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    in_names, _ = io_names(models[name])
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 256, size=(3, 61), dtype=np.int64)
    zeros = [np.zeros(bundle.manifest.state_shape(3), dtype=np.float32) for _ in bundle.manifest.state]

    whole = session.run(None, {in_names[0]: tokens, **dict(zip(in_names[1:], zeros))})
    state, pieces, start = zeros, [], 0
    for size in (1, 2, 13, 1, 30, 14):
        out = session.run(None, {in_names[0]: tokens[:, start : start + size], **dict(zip(in_names[1:], state))})
        pieces.append(out[0])
        state = out[1:]
        start += size
    assert start == tokens.shape[1]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole[0], atol=1e-5)
    for got, want in zip(state, whole[1:]):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(whole[0][:, 0] - whole[0][:, -1]).max() > 1e-3  # the state really changes the output
