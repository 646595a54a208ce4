"""Train a byte-level language model: truncated BPTT over parallel streams of the corpus.

As in PyTorch's word_language_model example, the training text is cut into ``batch_size``
contiguous streams that are read side by side in chunks of ``bptt`` bytes; the recurrent state is
carried from one chunk to the next (detached, so gradients stop at the chunk edge). Each pass
starts at a seeded random offset below ``bptt`` so chunk edges move between passes.
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from .config import LMTrainConfig
from .data import batchify, chunks, to_tensor
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

LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, no data); the message is one line for the user."""


def bits_per_byte(model: RecurrentModel, rows: torch.Tensor, chunk: int = 512) -> tuple[float, int]:
    """Mean cross-entropy in bits over every next-byte prediction in ``rows`` [streams, length],
    each stream read from a zero state; returns (bits per byte, bytes scored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    state = model.init_state(rows.size(0))
    with torch.no_grad():
        for x, y in chunks(rows, chunk):
            logits, state = model(x, state)
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
            count += y.numel()
    model.train(was_training)
    return total / count / LN2, count


def _passes(rows: torch.Tensor, bptt: int, rng: random.Random):
    """Endless (inputs, targets, starts_a_pass) over the training streams."""
    first = True
    while True:
        offset = 0 if first else rng.randrange(bptt)
        fresh = True
        for x, y in chunks(rows[:, offset:], bptt):
            yield x, y, fresh
            fresh = False
        first = False


def _train_step(model, optimizer, x, y, state, bf16: bool, clip: float) -> tuple[float, tuple[torch.Tensor, ...]]:
    """One truncated-BPTT update; returns the chunk's mean loss (nats) and the state to carry."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, state = model(x, state)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach()), state


def train_lm(
    model_config: ModelConfig,
    config: LMTrainConfig,
    train_bytes: bytes,
    val_bytes: bytes,
    progress: Progress | None = None,
) -> tuple[RecurrentModel, History]:
    """Train a language model on ``train_bytes``, validating on ``val_bytes`` after every epoch.

    An epoch is ``config.epoch_chunks`` BPTT chunks (a full pass over the training text when None).
    Training stops after ``config.steps`` updates, ``config.epochs`` epochs or when ``config.minutes``
    run out, whichever comes first (a partial last epoch is still validated); the weights of the best
    validation epoch are returned.
    """
    config.validate()
    model_config.validate()
    if model_config.input_kind != "tokens" or model_config.output_size != model_config.input_dim:
        raise ValueError("a language model reads tokens and predicts the same vocabulary")
    setup_torch(config)
    progress = progress or Progress(config.log_seconds)
    rng = random.Random(config.seed)

    train_rows = batchify(to_tensor(train_bytes), config.batch_size)
    val_streams = max(1, min(config.val_streams, len(val_bytes) // 256))
    val_rows = batchify(to_tensor(val_bytes), val_streams)
    chunks_per_pass = math.ceil((train_rows.size(1) - 1) / config.bptt)
    steps_per_epoch = config.epoch_chunks or chunks_per_pass

    model = RecurrentModel(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = History(metric="val_bits_per_byte", higher_is_better=False)
    best = BestCheckpoint()
    budget = Budget(config, steps_per_epoch)
    stream = _passes(train_rows, config.bptt, rng)
    threads = ThreadChooser(config)
    bf16 = config.use_bf16()
    log_every = max(1, steps_per_epoch // 10)
    state: tuple[torch.Tensor, ...] = ()
    val_seconds = 0.0
    window_loss, window_bytes = 0.0, 0
    epoch_loss, epoch_bytes = 0.0, 0
    progress.line(
        f"training {model_config.cell} {model_config.layers}x{model_config.hidden_size} "
        f"({parameter_count(model):,} parameters) on {len(train_bytes):,} bytes, "
        f"{config.batch_size} streams x {config.bptt} steps, {chunks_per_pass} chunks per pass, "
        f"{'bf16' if bf16 else 'fp32'} arithmetic"
    )
    model.train()
    while True:
        steps_this_epoch = 0
        for _ in range(steps_per_epoch):
            history.stopped_by = budget.stop_before_step(history.steps, reserve=val_seconds)
            if history.stopped_by:
                break
            x, y, fresh = next(stream)
            if fresh or not state or state[0].size(1) != x.size(0):
                state = model.init_state(x.size(0))
            else:
                state = tuple(s.detach() for s in state)
            fraction = budget.fraction(history.steps)
            set_lr(optimizer, scheduled_lr(config.lr, config.lr_floor, fraction, history.steps, config.warmup_steps))
            threads.before_step()
            value, state = _train_step(model, optimizer, x, y, state, bf16, config.clip)
            if threads.after_step():
                progress.line(threads.describe())
            if not math.isfinite(value):
                raise TrainingError(f"training diverged (loss {value}) at step {history.steps}; try a lower --lr")
            history.steps += 1
            history.samples += y.numel()
            steps_this_epoch += 1
            window_loss += value * y.numel()
            window_bytes += y.numel()
            epoch_loss += value * y.numel()
            epoch_bytes += y.numel()
            if history.steps % log_every == 0:
                history.train.append(
                    {
                        "step": history.steps,
                        "seconds": round(budget.elapsed(), 2),
                        "samples": history.samples,
                        "bits_per_byte": window_loss / window_bytes / LN2,
                    }
                )
                window_loss, window_bytes = 0.0, 0
            progress.update(
                f"epoch {history.epochs + 1} step {history.steps} | train {value / LN2:.3f} bits/byte | "
                f"{history.samples / max(budget.elapsed(), 1e-9):,.0f} bytes/s | {budget.elapsed():.0f}s"
            )
        if steps_this_epoch == 0:
            break
        history.epochs += 1
        started = time.perf_counter()
        val_bpb, scored = bits_per_byte(model, val_rows)
        val_seconds = time.perf_counter() - started
        train_bpb = epoch_loss / epoch_bytes / LN2
        epoch_loss, epoch_bytes = 0.0, 0
        improved = history.record_val(
            {
                "epoch": history.epochs,
                "step": history.steps,
                "seconds": round(budget.elapsed(), 2),
                "samples": history.samples,
                "train_bits_per_byte": train_bpb,
                "val_bits_per_byte": val_bpb,
                "val_bytes_scored": scored,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        if improved:
            best.save(model)
        progress.line(
            f"epoch {history.epochs}: train {train_bpb:.3f} val {val_bpb:.3f} bits/byte"
            f"{' (best)' if improved else ''} | {history.samples:,} bytes seen | {budget.elapsed():.0f}s"
        )
        if should_stop(history, budget, reserve=val_seconds):
            break
    return finish_training(model, history, budget, threads, best)
