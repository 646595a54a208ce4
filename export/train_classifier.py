"""Train a streaming sequence classifier: class logits at every step, judged on the last one.

The model emits a running prediction after each step (what the server streams back). Training
puts the full loss on each sequence's last real step and ``early_weight`` times the mean loss on
its earlier steps, so early predictions are sensible guesses rather than noise. Validation
accuracy is measured on the last step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .classify_data import ClassifierData, SequenceSet
from .config import ClassifierTrainConfig
from .loop import (
    BestCheckpoint,
    Budget,
    History,
    Progress,
    ThreadChooser,
    finish_training,
    parameter_count,
    scheduled_lr,
    set_lr,
    setup_torch,
    should_stop,
)
from .model import ModelConfig, RecurrentModel
from .train import TrainingError


def _batch(data: SequenceSet, index: torch.Tensor):
    lengths = data.lengths[index]
    steps = int(lengths.max())
    return data.inputs[index][:, :steps], lengths, data.targets[index]


def sequence_loss(
    logits: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, early_weight: float
) -> torch.Tensor:
    """Cross-entropy on each sequence's last step plus ``early_weight`` x the mean over earlier steps."""
    rows = torch.arange(logits.size(0))
    last = F.cross_entropy(logits[rows, lengths - 1], targets)
    if early_weight == 0 or logits.size(1) < 2:
        return last
    steps = torch.arange(logits.size(1)).unsqueeze(0)
    earlier = (steps < (lengths - 1).unsqueeze(1)).float()  # real steps before the last one
    if earlier.sum() == 0:
        return last
    per_step = F.cross_entropy(
        logits.transpose(1, 2), targets.unsqueeze(1).expand(-1, logits.size(1)), reduction="none"
    )
    return last + early_weight * (per_step * earlier).sum() / earlier.sum()


def evaluate_classifier(model: RecurrentModel, data: SequenceSet, batch_size: int = 256) -> dict:
    """Last-step accuracy and cross-entropy over ``data``."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x, lengths, targets = _batch(data, torch.arange(start, min(start + batch_size, len(data))))
            logits, _ = model(x, model.init_state(x.size(0)))
            last = logits[torch.arange(x.size(0)), lengths - 1]
            correct += int((last.argmax(-1) == targets).sum())
            loss_sum += float(F.cross_entropy(last, targets, reduction="sum"))
    model.train(was_training)
    return {"val_accuracy": correct / len(data), "val_loss": loss_sum / len(data)}


def train_classifier(
    model_config: ModelConfig,
    config: ClassifierTrainConfig,
    data: ClassifierData,
    progress: Progress | None = None,
) -> tuple[RecurrentModel, History]:
    """Train on ``data.train``, validate on ``data.val`` after every epoch (one pass), and return
    the weights of the most accurate epoch (ties go to the lower validation loss)."""
    config.validate()
    model_config.validate()
    if model_config.input_kind != data.input_kind or model_config.input_dim != data.input_dim:
        raise ValueError(
            f"model reads {model_config.input_kind}/{model_config.input_dim}, "
            f"data is {data.input_kind}/{data.input_dim}"
        )
    if model_config.output_size != len(data.labels):
        raise ValueError(f"model has {model_config.output_size} outputs for {len(data.labels)} labels")
    setup_torch(config)
    progress = progress or Progress(config.log_seconds)
    generator = torch.Generator().manual_seed(config.seed)

    model = RecurrentModel(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    history = History(metric="val_score", higher_is_better=True)
    best = BestCheckpoint()
    budget = Budget(config, steps_per_epoch)
    threads = ThreadChooser(config)
    progress.line(
        f"training {model_config.cell} {model_config.layers}x{model_config.hidden_size} "
        f"({parameter_count(model):,} parameters) on {len(data.train):,} sequences, {len(data.labels)} labels"
    )
    model.train()
    while True:
        order = torch.randperm(len(data.train), generator=generator)
        loss_sum, seen, correct = 0.0, 0, 0
        for start in range(0, len(order), config.batch_size):
            history.stopped_by = budget.stop_before_step(history.steps)
            if history.stopped_by:
                break
            x, lengths, targets = _batch(data.train, order[start : start + config.batch_size])
            set_lr(
                optimizer,
                scheduled_lr(
                    config.lr, config.lr_floor, budget.fraction(history.steps), history.steps, config.warmup_steps
                ),
            )
            threads.before_step()
            logits, _ = model(x, model.init_state(x.size(0)))
            loss = sequence_loss(logits, lengths, targets, config.early_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            if threads.after_step():
                progress.line(threads.describe())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"training diverged (loss {value}) at step {history.steps}; try a lower --lr")
            history.steps += 1
            history.samples += x.size(0)
            seen += x.size(0)
            loss_sum += value * x.size(0)
            correct += int((logits.detach()[torch.arange(x.size(0)), lengths - 1].argmax(-1) == targets).sum())
            progress.update(
                f"epoch {history.epochs + 1} step {history.steps} | loss {value:.3f} | {budget.elapsed():.0f}s"
            )
        if seen == 0:
            break
        history.epochs += 1
        scores = evaluate_classifier(model, data.val)
        history.train.append(
            {
                "step": history.steps,
                "seconds": round(budget.elapsed(), 2),
                "samples": history.samples,
                "loss": loss_sum / seen,
                "accuracy": correct / seen,
            }
        )
        # Accuracy picks the checkpoint; the small loss term only breaks ties between equal accuracies.
        score = scores["val_accuracy"] - 1e-6 * scores["val_loss"]
        improved = history.record_val(
            {
                "epoch": history.epochs,
                "step": history.steps,
                "seconds": round(budget.elapsed(), 2),
                "samples": history.samples,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                **scores,
                "val_score": score,
            }
        )
        if improved:
            best.save(model)
        progress.line(
            f"epoch {history.epochs}: train loss {loss_sum / seen:.3f} acc {correct / seen:.3f} | "
            f"val loss {scores['val_loss']:.3f} acc {scores['val_accuracy']:.3f}{' (best)' if improved else ''}"
        )
        if should_stop(history, budget):
            break
    return finish_training(model, history, budget, threads, best)
