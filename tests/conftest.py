"""Shared fixtures: tiny, untrained (seeded) bundles of every cell and input kind.

Untrained weights are enough for numerics and serving tests; training is tested in
tests/test_export_*.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def make_tiny_bundle(
    root: Path,
    name: str,
    cell: str = "lstm",
    kind: str = "lm",
    input_kind: str = "tokens",
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    version: int | None = None,
):
    """Write a small seeded model as a bundle under ``root`` and return the Bundle."""
    import torch

    from seqserve.export.model import ModelConfig, RecurrentModel
    from seqserve.export.package import write_bundle

    torch.set_num_threads(1)  # tiny models: thread start-up and spinning cost more than they save
    torch.manual_seed(seed)
    if input_kind == "tokens":
        cfg = ModelConfig(
            cell=cell,
            input_kind="tokens",
            input_dim=256,
            embedding_size=16,
            hidden_size=hidden,
            layers=layers,
            dropout=0.0,
            output_size=256 if kind == "lm" else 4,
        )
    else:
        cfg = ModelConfig(
            cell=cell,
            input_kind="features",
            input_dim=8,
            hidden_size=hidden,
            layers=layers,
            dropout=0.0,
            output_size=10,
        )
    model = RecurrentModel(cfg).eval()
    labels = None if kind == "lm" else [f"class{i}" for i in range(cfg.output_size)]
    bundle = write_bundle(
        model, root, name, kind, version=version, labels=labels, data={"description": "random weights (test fixture)"}
    )
    return bundle, model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A model directory holding one bundle of each flavour, plus the PyTorch modules behind them.

    Returns (models_dir, {name: RecurrentModel}).
    """
    root = tmp_path_factory.mktemp("models")
    specs = {
        "lm-lstm": dict(cell="lstm"),
        "lm-gru": dict(cell="gru"),
        "lm-rnn": dict(cell="rnn", layers=1),
        "cls-lstm": dict(cell="lstm", kind="classifier"),
        "feat-gru": dict(cell="gru", kind="classifier", input_kind="features"),
    }
    models = {}
    for i, (name, spec) in enumerate(specs.items()):
        _, models[name] = make_tiny_bundle(root, name, seed=i, **spec)
    return root, models


# The engine tests' fixtures (tests/engine_support.py holds their helpers).
@pytest.fixture(scope="session")
def engine_models(tiny_models, tmp_path_factory):
    """lm-lstm, lm-gru, lm-rnn, cls-lstm and feat-gru (feature frames), plus 'liar': lm-lstm's graph under a manifest claiming a
    vocabulary of 300, so token ids 256-299 pass validation and make the model run itself fail
    (an embedding index past the table, on the CPU provider). Returns (root, torch modules)."""
    from tests import engine_support

    src, torch_models = tiny_models
    root = tmp_path_factory.mktemp("engine-models")
    for name in ("lm-lstm", "lm-gru", "lm-rnn", "cls-lstm", "feat-gru"):
        engine_support.copy_bundle(src, name, root, name)
    engine_support.copy_bundle(src, "lm-lstm", root, "liar", input_dim=300)
    return root, torch_models


@pytest.fixture(params=["on", "off"], ids=["batched", "naive"])
def batching(request) -> str:
    """The engine tests' two scheduling modes: batching on, and the naive one-run-per-request mode."""
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch references on one thread (2-core machine, tiny models)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
