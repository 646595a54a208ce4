"""The long-range dependency tasks of the cell study, and training one model on one of them.

Adding problem: every step is a pair (value, marker); values are uniform in [0, 1], exactly two
markers are 1 (one in each half of the sequence). The target is the sum of the two marked values,
read from the output at the last step. Predicting the mean (1.0) scores MSE 1/6.

Copy task: ``symbols`` tokens from an alphabet of ``alphabet`` letters open the sequence, blanks
follow, a "go" token sits just before the last ``symbols`` positions, where the model must output
the opening tokens in order. Chance accuracy is 1/alphabet.

``length`` is the full sequence length for both, so the information the output needs is
``length - 1`` (adding, at worst) or ``length - symbols`` (copy) steps away from where it is read.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .model import ModelConfig, RecurrentModel

CELLS = ("rnn", "lstm", "gru")
TASKS = ("adding", "copy")
ADDING_BASELINE_MSE = 1.0 / 6.0  # variance of the sum of two independent uniform[0, 1] values


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the two tasks; shared by every cell, length and seed of a study."""

    alphabet: int = 8  # copy: letters to remember; chance accuracy is 1/alphabet
    symbols: int = 3  # copy: letters per sequence (memory load: symbols * log2(alphabet) bits)


# ---------------------------------------------------------------- data


def adding_batch(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return features [batch, length, 2] and targets [batch]."""
    if length < 2:
        raise ValueError(f"the adding problem needs length >= 2, got {length}")
    values = torch.rand(batch, length, generator=gen)
    half = length // 2
    first = torch.randint(0, half, (batch,), generator=gen)
    second = torch.randint(half, length, (batch,), generator=gen)
    rows = torch.arange(batch)
    markers = torch.zeros(batch, length)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), target


def copy_batch(batch: int, length: int, spec: TaskSpec, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return tokens [batch, length] and the letters to recall [batch, symbols]."""
    if length < 2 * spec.symbols + 1:
        raise ValueError(
            f"the copy task with {spec.symbols} symbols needs length >= {2 * spec.symbols + 1}, got {length}"
        )
    blank, go = spec.alphabet, spec.alphabet + 1
    letters = torch.randint(0, spec.alphabet, (batch, spec.symbols), generator=gen)
    tokens = torch.full((batch, length), blank, dtype=torch.long)
    tokens[:, : spec.symbols] = letters
    tokens[:, length - spec.symbols - 1] = go
    return tokens, letters


def make_batch(task: str, batch: int, length: int, spec: TaskSpec, gen: torch.Generator):
    if task == "adding":
        return adding_batch(batch, length, gen)
    if task == "copy":
        return copy_batch(batch, length, spec, gen)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ---------------------------------------------------------------- models


def model_config(task: str, cell: str, hidden: int, spec: TaskSpec) -> ModelConfig:
    """One recurrent layer, no dropout: the cell is the only thing that differs between runs."""
    if task == "adding":
        return ModelConfig(
            cell=cell, input_kind="features", input_dim=2, hidden_size=hidden, layers=1, dropout=0.0, output_size=1
        )
    return ModelConfig(
        cell=cell,
        input_kind="tokens",
        input_dim=spec.alphabet + 2,
        embedding_size=8,
        hidden_size=hidden,
        layers=1,
        dropout=0.0,
        output_size=spec.alphabet,
    )


def count_parameters(config: ModelConfig) -> int:
    """Trainable parameters of a model with this config (built once, on the CPU)."""
    return sum(p.numel() for p in RecurrentModel(config).parameters())


def matched_hidden_sizes(task: str, lstm_hidden: int, spec: TaskSpec) -> dict[str, dict[str, int]]:
    """Hidden size per cell whose total parameter count is closest to the LSTM's at ``lstm_hidden``.

    Returns ``{cell: {"hidden": h, "parameters": n}}``.
    """
    target = count_parameters(model_config(task, "lstm", lstm_hidden, spec))
    sizes = {}
    for cell in CELLS:
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
        guess = max(1, round(lstm_hidden * math.sqrt(4 / gates)))
        candidates = range(max(1, guess - 8), guess + 9)
        best = min(candidates, key=lambda h: abs(count_parameters(model_config(task, cell, h, spec)) - target))
        sizes[cell] = {"hidden": best, "parameters": count_parameters(model_config(task, cell, best, spec))}
    return sizes


# ---------------------------------------------------------------- loss, metric, gradient probe


def task_loss(
    task: str, logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec, reduction: str = "mean"
) -> torch.Tensor:
    """Adding: squared error at the last step. Copy: cross-entropy over the recall positions."""
    if task == "adding":
        err = (logits[:, -1, 0] - target) ** 2
        return err.mean() if reduction == "mean" else err.sum()
    recall = logits[:, -spec.symbols :, :]
    return nn.functional.cross_entropy(recall.reshape(-1, spec.alphabet), target.reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(task: str, model: RecurrentModel, x: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> dict:
    """Adding: MSE (and the mean-prediction MSE on the same set). Copy: per-letter accuracy."""
    model.eval()
    logits, _ = model(x, model.init_state(x.shape[0]))
    if task == "adding":
        mse = float(((logits[:, -1, 0] - target) ** 2).mean())
        baseline = float(((target - 1.0) ** 2).mean())
        return {"mse": mse, "baseline_mse": baseline}
    guess = logits[:, -spec.symbols :, :].argmax(-1)
    return {"accuracy": float((guess == target).float().mean()), "chance": 1.0 / spec.alphabet}


def gradient_by_distance(
    task: str, model: RecurrentModel, x: torch.Tensor, target: torch.Tensor, spec: TaskSpec
) -> list[float]:
    """Mean over sequences of ||dL/dx_t|| where x_t is the recurrent layer's input at step t
    (the feature frame, or the token's embedding), listed by distance from the last step
    (index 0 = last step). L is each sequence's own loss, so the norms do not shrink with batch."""
    model.eval()
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    if task == "adding":
        x = x.clone().requires_grad_(True)
    handle = model.embed.register_forward_hook(keep)
    try:
        logits, _ = model(x, model.init_state(x.shape[0]))
        model.zero_grad(set_to_none=True)
        task_loss(task, logits, target, spec, reduction="sum").backward()
    finally:
        handle.remove()
    grad = captured[0].grad  # [batch, length, width]
    assert grad is not None, "the hook captured the embeddings, so backward filled their gradient"
    norms = grad.norm(dim=-1).mean(dim=0)  # [length]
    model.zero_grad(set_to_none=True)
    return [float(v) for v in norms.flip(0)]


# ---------------------------------------------------------------- one training run


def set_forget_bias(model: RecurrentModel, value: float) -> None:
    """Set every LSTM layer's forget-gate bias (input-side) to ``value`` and its hidden-side twin to 0.
    PyTorch orders an LSTM's gates input, forget, cell, output."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in range(model.config.layers):
            getattr(model.rnn, f"bias_ih_l{layer}")[hidden : 2 * hidden].fill_(value)
            getattr(model.rnn, f"bias_hh_l{layer}")[hidden : 2 * hidden].fill_(0.0)


@dataclass(frozen=True)
class TrainSpec:
    """The training budget and optimiser, identical for every cell at every length."""

    steps: int = 1500  # optimiser steps per run: the shared training budget
    batch: int = 64  # sequences per step
    lr: float = 1e-2  # Adam learning rate (small models; 3e-3 left the LSTM on the plateau longer)
    lstm_forget_bias: float = 1.0  # LSTM forget-gate bias at init, as Keras/TensorFlow start it;
    # PyTorch's default (about 0) has an untrained LSTM forget half its cell state every step
    clip: float = 1.0  # gradient-norm clip: keeps exploding plain-RNN gradients from derailing runs
    test_size: int = 1000  # held-out sequences for the final metric (same set for every cell and seed)
    probe_size: int = 64  # sequences the gradient probe averages over
    probe_fractions: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)  # where in training the gradient is probed
    curve_points: int = 20  # training-loss values kept per run


def train_run(
    task: str, cell: str, length: int, seed: int, hidden: int, spec: TaskSpec, train: TrainSpec, probe: bool = False
) -> tuple[dict, RecurrentModel]:
    """Train one model; return its record (metric, loss curve, optional gradient probes) and the model.

    The data stream depends only on (task, length, seed), so every cell sees the same batches.
    """
    torch.manual_seed(seed)
    model = RecurrentModel(model_config(task, cell, hidden, spec))
    if cell == "lstm":
        set_forget_bias(model, train.lstm_forget_bias)
    data_gen = torch.Generator().manual_seed(1_000_003 * seed + length)
    test_x, test_y = make_batch(task, train.test_size, length, spec, torch.Generator().manual_seed(777 + length))
    probe_x, probe_y = make_batch(task, train.probe_size, length, spec, torch.Generator().manual_seed(999 + length))
    optimiser = torch.optim.Adam(model.parameters(), lr=train.lr)
    probe_steps = sorted({min(train.steps, round(f * train.steps)) for f in train.probe_fractions}) if probe else []
    grads, curve, window = {}, [], []
    every = max(1, train.steps // train.curve_points)
    start = time.perf_counter()
    for step in range(train.steps + 1):
        if step in probe_steps:
            grads[str(step)] = gradient_by_distance(task, model, probe_x, probe_y, spec)
        if step == train.steps:
            break
        model.train()
        x, y = make_batch(task, train.batch, length, spec, data_gen)
        logits, _ = model(x, model.init_state(train.batch))
        loss = task_loss(task, logits, y, spec)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), train.clip)
        optimiser.step()
        window.append(loss.item())
        if (step + 1) % every == 0:
            curve.append([step + 1, sum(window) / len(window)])
            window = []
    seconds = time.perf_counter() - start
    record = {
        "task": task,
        "cell": cell,
        "length": length,
        "seed": seed,
        "hidden": hidden,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": train.steps,
        "seconds": round(seconds, 2),
        "test": evaluate(task, model, test_x, test_y, spec),
        "train_loss": curve,
    }
    if probe:
        record["grad_by_distance"] = grads
    return record, model


def use_one_thread() -> None:
    """Process initializer for study workers: one intra-op thread each, so N workers use N cores."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def one_thread():
    """Train with one intra-op thread (these models are too small to gain from more, and extra
    threads spin against other work on a busy machine); restore the previous setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_job(
    task: str, cell: str, length: int, seed: int, hidden: int, spec: TaskSpec, train: TrainSpec, probe: bool
) -> dict:
    """``train_run`` without the model: what a worker process sends back."""
    record, _ = train_run(task, cell, length, seed, hidden, spec, train, probe=probe)
    return record
