"""Write a RecurrentModel to ONNX with explicit state inputs/outputs and dynamic batch/seq axes.

Uses the TorchScript-based exporter (``dynamo=False``): it emits native ONNX LSTM/GRU/RNN ops with
weights as constant initializers (so ONNX Runtime prepacks them) and keeps batch and sequence
truly dynamic, which the torch.export-based exporter does not for stacked RNNs.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from .model import RecurrentModel

OPSET = 17


def io_names(model: RecurrentModel) -> tuple[list[str], list[str]]:
    data = "tokens" if model.config.input_kind == "tokens" else "features"
    state_in = [f"{n}0" for n in model.state_names]
    state_out = [f"{n}n" for n in model.state_names]
    return [data, *state_in], ["logits", *state_out]


class _Flat(torch.nn.Module):
    """Flattens the state tuple into positional inputs/outputs for the exporter."""

    def __init__(self, model: RecurrentModel):
        super().__init__()
        self.model = model

    def forward(self, x, *state):
        logits, new_state = self.model(x, tuple(state))
        return (logits, *new_state)


def example_input(
    model: RecurrentModel, batch: int, seq: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    cfg = model.config
    if cfg.input_kind == "tokens":
        return torch.randint(0, cfg.input_dim, (batch, seq), generator=generator)
    return torch.randn(batch, seq, cfg.input_dim, generator=generator)


def export_onnx(model: RecurrentModel, path: Path | str) -> Path:
    was_training = model.training
    model.eval()
    inputs, outputs = io_names(model)
    x = example_input(model, 2, 3)
    state = model.init_state(2)
    axes = {inputs[0]: {0: "batch", 1: "seq"}, outputs[0]: {0: "batch", 1: "seq"}}
    for name in inputs[1:] + outputs[1:]:
        axes[name] = {1: "batch"}
    buffer: Any = io.BytesIO()  # torch's annotation says a path; the exporter writes to a file object too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Flat(model).eval(),  # a fresh module is in training mode; the exporter restores it after
            (x, *state),
            buffer,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    model.train(was_training)
    out = Path(path)
    out.write_bytes(buffer.getvalue())
    return out
