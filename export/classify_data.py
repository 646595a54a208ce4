"""Classifier data: labelled sequences, padded into tensors, split per label by seed.

* ``digits``  scikit-learn's 8x8 handwritten digits (shipped inside the package, no download),
              each image read top to bottom as 8 steps of 8 features scaled to 0..1;
* a ``.jsonl`` file of ``{"text": ..., "label": ...}`` lines, classified over the text's UTF-8
              bytes; the labels are the sorted distinct training labels.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DataError


@dataclass
class SequenceSet:
    """Padded sequences: ``inputs`` [n, steps] (tokens) or [n, steps, dim] (features)."""

    inputs: torch.Tensor
    lengths: torch.Tensor  # real steps per sequence (the rest is padding at the end)
    targets: torch.Tensor  # class index per sequence

    def __len__(self) -> int:
        return int(self.targets.numel())


@dataclass
class ClassifierData:
    name: str  # "digits" or the file name
    input_kind: str  # "features" or "tokens"
    input_dim: int  # features per step, or 256 byte ids
    labels: list[str]
    train: SequenceSet
    val: SequenceSet
    source: str  # where the examples came from
    split: str  # how validation was chosen

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "source": self.source,
            "input_kind": self.input_kind,
            "train_sequences": len(self.train),
            "val_sequences": len(self.val),
            "labels": len(self.labels),
            "split": self.split,
        }


def _split_note(val_fraction: float, seed: int) -> str:
    return f"per label, a random {val_fraction:.0%} held out (seed {seed})"


def split_per_label(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for training and validation: from each label a seeded random ``val_fraction`` of
    its examples is held out, always leaving at least one of them for training."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_label.setdefault(target, []).append(index)
    train, val = [], []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        held = min(len(members) - 1, int(round(len(members) * val_fraction)))
        val.extend(members[:held])
        train.extend(members[held:])
    return sorted(train), sorted(val)


def _subset(full: SequenceSet, index: list[int]) -> SequenceSet:
    pick = torch.tensor(index, dtype=torch.long)
    return SequenceSet(full.inputs[pick], full.lengths[pick], full.targets[pick])


def load_digits_data(seed: int, val_fraction: float) -> ClassifierData:
    """scikit-learn's digits as 8 rows of 8 features, 10 labels "0".."9"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(np.asarray(digits.images, dtype=np.float32) / 16.0)  # [n, 8 rows, 8 columns]
    targets = [int(t) for t in digits.target]
    full = SequenceSet(
        images, torch.full((len(targets),), images.shape[1], dtype=torch.long), torch.tensor(targets, dtype=torch.long)
    )
    train, val = split_per_label(targets, val_fraction, seed)
    return ClassifierData(
        "digits",
        "features",
        images.shape[2],
        [str(i) for i in range(10)],
        _subset(full, train),
        _subset(full, val),
        "sklearn.datasets.load_digits (8x8 images, rows as steps)",
        _split_note(val_fraction, seed),
    )


def read_jsonl(path: Path) -> list[tuple[bytes, str]]:
    """(text as UTF-8 bytes, label) per line; DataError names the file and line of any problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    examples = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text_line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {number} is not UTF-8 (invalid byte at column {exc.start + 1})") from None
        try:
            record = json.loads(text_line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or "text" not in record or "label" not in record:
            raise DataError(f'{path} line {number} must be an object with "text" and "label"')
        text, label = record["text"], record["label"]
        if not isinstance(text, str) or not text:
            raise DataError(f'{path} line {number}: "text" must be a non-empty string')
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) == "":
            raise DataError(f'{path} line {number}: "label" must be a non-empty string or an integer')
        examples.append((text.encode("utf-8"), str(label)))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _encode(examples: list[tuple[bytes, str]], labels: list[str], max_len: int) -> SequenceSet:
    index = {name: i for i, name in enumerate(labels)}
    lengths = [min(len(text), max_len) for text, _ in examples]
    inputs = torch.zeros(len(examples), max(lengths), dtype=torch.long)
    for row, (text, _) in enumerate(examples):
        inputs[row, : lengths[row]] = torch.tensor(list(text[: lengths[row]]), dtype=torch.long)
    targets = torch.tensor([index[label] for _, label in examples], dtype=torch.long)
    return SequenceSet(inputs, torch.tensor(lengths, dtype=torch.long), targets)


def load_jsonl_data(
    path: Path, seed: int, val_fraction: float, max_len: int, val_path: Path | None = None
) -> ClassifierData:
    """Labelled texts from ``path``; validation from ``val_path`` or a per-label seeded split.

    Labels are the sorted distinct training labels; a validation label never seen in training is
    an error ("unknown label").
    """
    examples = read_jsonl(path)
    if val_path is not None:
        train_examples, val_examples = examples, read_jsonl(val_path)
        split = f"validation file {val_path.name}"
    else:
        label_names = sorted({label for _, label in examples})
        targets = [label_names.index(label) for _, label in examples]
        train_index, val_index = split_per_label(targets, val_fraction, seed)
        train_examples = [examples[i] for i in train_index]
        val_examples = [examples[i] for i in val_index]
        split = _split_note(val_fraction, seed)
    labels = sorted({label for _, label in train_examples})
    if len(labels) < 2:
        raise DataError(f"{path} has {len(labels)} distinct label(s); a classifier needs at least 2")
    unknown = sorted({label for _, label in val_examples} - set(labels))
    if unknown:
        where = val_path if val_path is not None else path
        raise DataError(f"unknown label {unknown[0]!r} in {where}: not among the training labels {labels}")
    if not val_examples:
        raise DataError(
            f"{path} has too few examples to hold any out for validation; add more or pass a validation file"
        )
    return ClassifierData(
        path.name,
        "tokens",
        256,
        labels,
        _encode(train_examples, labels, max_len),
        _encode(val_examples, labels, max_len),
        str(path),
        split,
    )
