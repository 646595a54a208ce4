"""PyTorch vs ONNX Runtime parity, run on every export; the result goes in the manifest."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .model import RecurrentModel
from .onnx_export import example_input, io_names

# (batch, seq) shapes every export is checked on: single step, a wide batch, a long odd sequence.
PARITY_SHAPES = ((1, 1), (64, 1), (3, 257), (5, 17))
TOLERANCE = 1e-5


class ParityError(Exception):
    """The exported graph does not reproduce the PyTorch model."""


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_ort(session, names: list[str], x: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
    feeds = {names[0]: x}
    feeds.update({n: s for n, s in zip(names[1:], state)})
    return session.run(None, feeds)


def check_parity(model: RecurrentModel, onnx_path: Path | str, seed: int = 0, tolerance: float = TOLERANCE) -> dict:
    """Compare the ONNX graph with the model on random inputs and random states, and check that
    running a sequence in chunks with carried state equals running it whole.

    Returns the manifest's ``parity`` record; raises ParityError if any difference exceeds
    ``tolerance``.
    """
    model = model.eval()
    session = _ort_session(Path(onnx_path))
    in_names, _ = io_names(model)
    gen = torch.Generator().manual_seed(seed)
    shapes = []
    worst = 0.0
    start = time.perf_counter()
    for batch, seq in PARITY_SHAPES:
        x = example_input(model, batch, seq, gen)
        state = tuple(torch.randn(s.shape, generator=gen) * 0.5 for s in model.init_state(batch))
        with torch.no_grad():
            logits, new_state = model(x, state)
        got = _run_ort(session, in_names, x.numpy(), [s.numpy() for s in state])
        diff = max(
            float(np.abs(got[0] - logits.numpy()).max()),
            *(float(np.abs(g - r.numpy()).max()) for g, r in zip(got[1:], new_state)),
        )
        shapes.append({"batch": batch, "seq": seq, "max_abs_diff": diff})
        worst = max(worst, diff)

    # Chunked with carried state (through ONNX Runtime) vs one whole run (PyTorch).
    x = example_input(model, 2, 50, gen)
    with torch.no_grad():
        whole, whole_state = model(x, model.init_state(2))
    state = [s.numpy() for s in model.init_state(2)]
    pieces = []
    for lo, hi in ((0, 1), (1, 8), (8, 9), (9, 33), (33, 50)):
        out = _run_ort(session, in_names, x[:, lo:hi].numpy(), state)
        pieces.append(out[0])
        state = out[1:]
    chunked = np.concatenate(pieces, axis=1)
    chunk_diff = max(
        float(np.abs(chunked - whole.numpy()).max()),
        *(float(np.abs(s - w.numpy()).max()) for s, w in zip(state, whole_state)),
    )
    worst = max(worst, chunk_diff)
    record = {
        "passed": worst <= tolerance,
        "tolerance": tolerance,
        "max_abs_diff": worst,
        "shapes": shapes,
        "chunked_vs_whole_max_abs_diff": chunk_diff,
        "chunks": [1, 7, 1, 24, 17],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if not record["passed"]:
        raise ParityError(
            f"ONNX Runtime output differs from PyTorch by {worst:.3g} (tolerance {tolerance:g}); bundle not written"
        )
    return record


def check_dynamic_axes(onnx_path: Path | str) -> None:
    """Fail unless batch and sequence axes are symbolic in the graph's declared inputs and outputs."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        symbolic = [d.dim_param for d in dims if d.dim_param]
        if "batch" not in symbolic:
            raise ParityError(f"{value.name}: batch axis is not dynamic in the exported graph")
        if value.name in ("tokens", "features", "logits") and "seq" not in symbolic:
            raise ParityError(f"{value.name}: sequence axis is not dynamic in the exported graph")
