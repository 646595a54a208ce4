"""PyTorch vs ONNX Runtime parity, run on every export; the result goes in the manifest."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from .model import RecurrentModel
from .onnx_export import example_input, io_names

# (batch, seq) shapes every export is checked on: single step, a wide batch, a long odd sequence.
PARITY_SHAPES = ((1, 1), (64, 1), (3, 257), (5, 17))
# Errors are scaled, |x - ref| / (1 + |ref|): absolute near zero, relative for large values (a
# trained LSTM's cell state passes 100 over a few hundred steps). The reference is the PyTorch
# model run in float64. ONNX Runtime passes when its error is at most TOLERANCE, or at most
# NOISE_FACTOR times the error of PyTorch's own float32 run, whichever is larger: over long
# sequences a trained model amplifies float32 rounding (measured on the default 1x512 LSTM at 257
# steps: PyTorch float32 4.0e-5, ONNX Runtime 4.9e-5 from float64; 8.9e-5 from each other), so a
# fixed bound either rejects sound exports or is too loose on short ones. A graph with other
# weights is off by more than 1e-2.
TOLERANCE = 1e-5
NOISE_FACTOR = 4.0


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


def _scaled(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest |x - ref| / (1 + |ref|) over logits and every state tensor."""
    return max(float((np.abs(o - r) / (1.0 + np.abs(r))).max()) for o, r in zip(outputs, reference))


def _torch_run(model: RecurrentModel, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        logits, new_state = model(x, state)
    return [logits.numpy()] + [s.numpy() for s in new_state]


class _Reference:
    """The model in float64 (the reference) beside the float32 model (the noise yardstick)."""

    def __init__(self, model: RecurrentModel):
        self.model = model
        self.model64 = copy.deepcopy(model).double().eval()

    def run(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        x64 = x if x.dtype == torch.int64 else x.double()
        return _torch_run(self.model64, x64, tuple(s.double() for s in state)), _torch_run(self.model, x, state)


def _judge(name: str, ort_out, ref64, torch32, tolerance: float) -> dict:
    ort_error, torch_error = _scaled(ort_out, ref64), _scaled(torch32, ref64)
    bound = max(tolerance, NOISE_FACTOR * torch_error)
    return {
        "check": name,
        "onnx_error": ort_error,
        "torch_float32_error": torch_error,
        "bound": bound,
        "max_abs_diff": max(float(np.abs(o - t).max()) for o, t in zip(ort_out, torch32)),
        "passed": ort_error <= bound,
    }


def check_parity(model: RecurrentModel, onnx_path: Path | str, seed: int = 0, tolerance: float = TOLERANCE) -> dict:
    """Compare the ONNX graph with the model on random inputs and random states, and check that
    running a sequence in chunks through ONNX Runtime, carrying the state, equals one whole run.

    Returns the manifest's ``parity`` record; raises ParityError if ONNX Runtime is further from
    the float64 reference than allowed (see TOLERANCE and NOISE_FACTOR).
    """
    model = model.eval()
    reference = _Reference(model)
    session = _ort_session(Path(onnx_path))
    in_names, _ = io_names(model)
    gen = torch.Generator().manual_seed(seed)
    checks = []
    start = time.perf_counter()
    for batch, seq in PARITY_SHAPES:
        x = example_input(model, batch, seq, gen)
        state = tuple(torch.randn(s.shape, generator=gen) * 0.5 for s in model.init_state(batch))
        ref64, torch32 = reference.run(x, state)
        got = _run_ort(session, in_names, x.numpy(), [s.numpy() for s in state])
        checks.append({"batch": batch, "seq": seq, **_judge(f"{batch}x{seq}", got, ref64, torch32, tolerance)})

    # Chunked with carried state (through ONNX Runtime) vs one whole run.
    x = example_input(model, 2, 50, gen)
    ref64, torch32 = reference.run(x, model.init_state(2))
    carried = [s.numpy() for s in model.init_state(2)]
    pieces = []
    for lo, hi in ((0, 1), (1, 8), (8, 9), (9, 33), (33, 50)):
        out = _run_ort(session, in_names, x[:, lo:hi].numpy(), carried)
        pieces.append(out[0])
        carried = out[1:]
    chunked = _judge("chunked", [np.concatenate(pieces, axis=1), *carried], ref64, torch32, tolerance)
    everything = checks + [chunked]
    failed = [c for c in everything if not c["passed"]]
    record = {
        "passed": not failed,
        "criterion": "max |x - ref| / (1 + |ref|) over logits and state, ref = PyTorch in float64; "
        f"ONNX Runtime within max({tolerance:g}, {NOISE_FACTOR:g} x PyTorch float32's own error)",
        "tolerance": tolerance,
        "noise_factor": NOISE_FACTOR,
        "max_onnx_error": max(c["onnx_error"] for c in everything),
        "max_torch_float32_error": max(c["torch_float32_error"] for c in everything),
        "max_abs_diff": max(c["max_abs_diff"] for c in everything),
        "shapes": [{k: v for k, v in c.items() if k != "check"} for c in checks],
        "chunked_vs_whole": {k: v for k, v in chunked.items() if k != "check"},
        "chunks": [1, 7, 1, 24, 17],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if failed:
        worst = max(failed, key=lambda c: c["onnx_error"] / c["bound"])
        raise ParityError(
            f"ONNX Runtime output differs from the model by {worst['onnx_error']:.3g} (scaled) on the "
            f"{worst['check']} check, above the bound {worst['bound']:.3g}; bundle not written"
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
