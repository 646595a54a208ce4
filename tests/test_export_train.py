"""Training loops on small slices of the real data: they learn, keep the best epoch, honour the
budget, and are reproducible with a step budget."""

from __future__ import annotations

import io
import math

import pytest
import torch

from seqserve.export.classify_data import load_digits_data, load_jsonl_data
from seqserve.export.config import ClassifierTrainConfig, LMTrainConfig, default_classifier_model
from seqserve.export.data import batchify, load_corpus, split_corpus, to_tensor
from seqserve.export.loop import Budget, Progress, scheduled_lr
from seqserve.export.model import ModelConfig
from seqserve.export.train import bits_per_byte, train_lm
from seqserve.export.train_classifier import evaluate_classifier, sequence_loss, train_classifier

pytestmark = pytest.mark.timeout(120)

QUIET = Progress(enabled=False)


@pytest.fixture(scope="module")
def docs_slice():
    train, val = split_corpus(load_corpus("docs").data)
    return train[:60_000], val[:6_000]


def tiny_lm(cell="lstm"):
    return ModelConfig(
        cell=cell,
        input_kind="tokens",
        input_dim=256,
        embedding_size=16,
        hidden_size=64,
        layers=1,
        dropout=0.0,
        output_size=256,
    )


def test_lm_learns_below_random_and_keeps_best(docs_slice):
    train, val = docs_slice
    config = LMTrainConfig(minutes=None, epochs=4, epoch_chunks=25, batch_size=16, bptt=32, lr=1e-2, threads=1)
    model, history = train_lm(tiny_lm(), config, train, val, progress=QUIET)
    values = [row["val_bits_per_byte"] for row in history.val]
    assert len(values) == 4 and history.stopped_by == "epochs"
    assert values[0] < 8.0  # random guessing is 8 bits per byte
    assert history.best_value < 5.5  # well below random: the byte distribution and more is learned
    assert history.best_value == min(values) < values[0]
    # The returned weights are the best epoch's.
    val_rows = batchify(to_tensor(val), config.val_streams)
    assert bits_per_byte(model, val_rows)[0] == pytest.approx(history.best_value, abs=1e-4)
    assert history.steps == 100 and history.samples == 100 * 16 * 32
    assert all(math.isfinite(row["bits_per_byte"]) for row in history.train)


def test_lm_time_budget_stops_and_validates(docs_slice):
    train, val = docs_slice
    config = LMTrainConfig(minutes=0.05, epoch_chunks=10_000, batch_size=8, bptt=16, threads=1)
    stream = io.StringIO()
    _, history = train_lm(tiny_lm("gru"), config, train, val, progress=Progress(interval=0.5, stream=stream))
    assert history.stopped_by == "time"
    assert history.epochs == 1 and len(history.val) == 1  # the partial epoch was validated
    assert history.seconds < 3 * 60 * 0.05 + 10
    text = stream.getvalue()
    assert "training gru 1x64" in text and "bits/byte" in text and "epoch 1:" in text


def test_lm_fixed_threads_and_epochs_is_reproducible(docs_slice):
    train, val = docs_slice
    config = LMTrainConfig(minutes=None, epochs=2, epoch_chunks=5, batch_size=8, bptt=16, threads=1, precision="fp32")
    _, first = train_lm(tiny_lm("rnn"), config, train, val, progress=QUIET)
    _, second = train_lm(tiny_lm("rnn"), config, train, val, progress=QUIET)
    assert [r["val_bits_per_byte"] for r in first.val] == [r["val_bits_per_byte"] for r in second.val]
    config.seed = 1
    _, third = train_lm(tiny_lm("rnn"), config, train, val, progress=QUIET)
    assert [r["val_bits_per_byte"] for r in third.val] != [r["val_bits_per_byte"] for r in first.val]


def test_lm_same_seed_and_steps_gives_identical_weights(docs_slice):
    """The default recipe's guarantee in miniature: a step budget (ending mid-epoch), the default
    precision and seed; two runs agree bit for bit in every loss and every weight."""
    train, val = docs_slice
    config = LMTrainConfig(steps=13, epoch_chunks=5, batch_size=8, bptt=16, threads=1, warmup_steps=2)
    runs = [train_lm(tiny_lm(), config, train, val, progress=QUIET) for _ in range(2)]
    (first_model, first), (second_model, second) = runs
    assert first.stopped_by == "steps" and first.steps == 13 and first.epochs == 3  # 5 + 5 + a validated 3
    assert first.samples == 13 * 8 * 16
    assert [r["bits_per_byte"] for r in first.train] == [r["bits_per_byte"] for r in second.train]
    assert [r["val_bits_per_byte"] for r in first.val] == [r["val_bits_per_byte"] for r in second.val]
    second_weights = second_model.state_dict()
    for name, tensor in first_model.state_dict().items():
        assert torch.equal(tensor, second_weights[name]), name
    # The schedule ran over the 13 steps: the last update used (almost) the floor rate.
    assert first.val[-1]["lr"] == pytest.approx(scheduled_lr(config.lr, config.lr_floor, 12 / 13, 12, 2))
    assert first.val[-1]["lr"] < 1.2 * config.lr * config.lr_floor


def test_default_lm_config_is_step_bounded():
    from seqserve.cli import build_parser
    from seqserve.export.cli import lm_train_config

    def parsed(*flags):
        argv = ["export", "lm", *flags]
        return lm_train_config(build_parser(argv).parse_args(argv))

    default = LMTrainConfig()
    assert default.steps and default.minutes is None and default.epochs is None
    from_cli = parsed()
    assert (from_cli.steps, from_cli.minutes, from_cli.epochs, from_cli.seed) == (default.steps, None, None, 0)
    assert parsed("--seed", "3", "--lr", "1e-3").steps == default.steps  # other flags keep the step budget
    # A budget given replaces the default one; several given: whichever runs out first.
    timed = parsed("--minutes", "2")
    assert (timed.minutes, timed.steps, timed.epochs) == (2.0, None, None)
    assert (parsed("--epochs", "3").epochs, parsed("--epochs", "3").steps) == (3, None)
    both = parsed("--steps", "40", "--minutes", "1")
    assert (both.steps, both.minutes) == (40, 1.0)


def test_step_budget_schedule_ignores_the_clock(monkeypatch):
    """Without a time budget the learning-rate schedule depends on the step alone, not on speed."""
    from seqserve.export import loop

    clock = {"now": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["now"])
    budget = Budget(LMTrainConfig(steps=100, epoch_chunks=30), steps_per_epoch=30)
    clock["now"] = 1e6  # a very slow machine
    assert budget.fraction(25) == pytest.approx(0.25) and budget.stop_before_step(99) == ""
    assert budget.stop_before_step(100) == "steps"
    capped = Budget(LMTrainConfig(steps=100, epochs=2), steps_per_epoch=30)  # 60 steps come first
    assert capped.fraction(30) == pytest.approx(0.5)
    timed = Budget(LMTrainConfig(steps=None, minutes=1.0), steps_per_epoch=30)
    assert timed.fraction(5) == 0.0 and timed.stop_before_step(10**6) == ""
    clock["now"] += 61
    assert timed.stop_before_step(0) == "time" and timed.fraction(5) == 1.0


def test_classifier_on_digits_beats_chance():
    config = ClassifierTrainConfig(epochs=10, threads=1, lr=1e-2)
    data = load_digits_data(config.seed, config.val_fraction)
    model_config = default_classifier_model("features", 8, 10, cell="gru")
    model_config.hidden_size = 32
    model, history = train_classifier(model_config, config, data, progress=QUIET)
    best = history.best_row()
    assert best["val_accuracy"] > 0.7  # chance is about 0.1
    assert evaluate_classifier(model, data.val)["val_accuracy"] == pytest.approx(best["val_accuracy"])
    # Per-step logits: a prediction after every row, not only the last.
    logits, _ = model(data.val.inputs[:3], model.init_state(3))
    assert logits.shape == (3, 8, 10)


def test_classifier_on_jsonl_text(tmp_path):
    import json
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(120):
        label = rng.choice(["digits", "letters"])
        alphabet = "0123456789" if label == "digits" else "abcdefghij"
        rows.append({"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 12))), "label": label})
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = ClassifierTrainConfig(epochs=6, threads=1, lr=1e-2)
    data = load_jsonl_data(path, config.seed, config.val_fraction, config.max_len)
    model_config = default_classifier_model("tokens", 256, 2, cell="lstm")
    model_config.hidden_size = 32
    _, history = train_classifier(model_config, config, data, progress=QUIET)
    assert history.best_row()["val_accuracy"] >= 0.9  # one byte decides the label


def test_sequence_loss_uses_each_sequence_last_real_step():
    logits = torch.zeros(2, 3, 2)
    logits[0, 0] = torch.tensor([5.0, -5.0])  # sequence 0 has one step: right at step 0
    logits[1, 2] = torch.tensor([-5.0, 5.0])  # sequence 1 has three steps: right at step 2
    logits[0, 2] = torch.tensor([-9.0, 9.0])  # padding: must be ignored
    lengths, targets = torch.tensor([1, 3]), torch.tensor([0, 1])
    assert float(sequence_loss(logits, lengths, targets, 0.0)) < 1e-3
    with_early = float(sequence_loss(logits, lengths, targets, 0.5))
    assert with_early == pytest.approx(0.5 * math.log(2), rel=1e-3)  # steps 0 and 1 of sequence 1 are undecided


def test_schedule_warms_up_then_decays():
    assert scheduled_lr(1.0, 0.1, 0.0, 0, 10) == pytest.approx(0.1)
    assert scheduled_lr(1.0, 0.1, 0.0, 9, 10) == pytest.approx(1.0)
    assert scheduled_lr(1.0, 0.1, 0.5, 50, 10) == pytest.approx(0.55)
    assert scheduled_lr(1.0, 0.1, 1.0, 99, 10) == pytest.approx(0.1)


def test_thread_chooser_keeps_the_faster_setting_and_rechecks(monkeypatch):
    """With a scripted clock: all cores win the first trial, then slow down; a re-trial picks one."""
    from seqserve.export import config as config_module
    from seqserve.export import loop
    from seqserve.export.config import TrainConfig

    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 2)
    clock = {"now": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["now"])
    before = torch.get_num_threads()
    chooser = loop.ThreadChooser(TrainConfig(epochs=1, threads=0), trial_steps=3, window=4)
    decisions = []
    try:
        for step in range(40):
            chooser.before_step()
            busy = step >= 12
            clock["now"] += {2: 0.05 if busy else 0.01, 1: 0.02}[torch.get_num_threads()]
            if chooser.after_step():
                decisions.append((step, chooser.chosen))
    finally:
        torch.set_num_threads(before)
    assert decisions[0] == (5, 2)  # 3 steps on 2 threads, then 3 on 1: two threads were faster
    assert decisions[1][1] == 1 and chooser.trials == 2  # all-core steps slowed 5x: re-trial picked one
    assert "using 1 thread(s)" in chooser.describe()
    fixed = loop.ThreadChooser(TrainConfig(epochs=1, threads=3))
    assert fixed.chosen == 3 and not fixed.after_step()  # an explicit count is never second-guessed
