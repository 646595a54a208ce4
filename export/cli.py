"""``seqserve export lm|classifier``: train a model on real data and write a bundle.

Every user error (bad data, bad hyper-parameters, an export that fails its parity check) ends as
one line and a non-zero exit through ``seqserve.cli.CommandError``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from seqserve.bundle import Bundle
from seqserve.cli import CommandError

from .config import ClassifierTrainConfig, LMTrainConfig, default_classifier_model, default_lm_model
from .data import DataError

_BUDGET_ARGS = ("steps", "epochs", "minutes")  # for lm, any of these given replaces the default step count


def _common(p: argparse.ArgumentParser, cell: str, model, train) -> None:
    """Options both tasks share; ``model``/``train`` are the task's default configs (for --help)."""
    p.add_argument("--cell", choices=("lstm", "gru", "rnn"), default=cell, help=f"recurrent cell (default {cell})")
    p.add_argument("--layers", type=int, help=f"stacked recurrent layers (default {model.layers})")
    p.add_argument("--hidden", type=int, help=f"state width per layer (default {model.hidden_size})")
    p.add_argument("--embedding", type=int, help=f"byte embedding width, token inputs (default {model.embedding_size})")
    p.add_argument(
        "--dropout", type=float, help=f"dropout between layers and before the head (default {model.dropout})"
    )
    p.add_argument(
        "--batch-size", type=int, help=f"parallel streams (lm) or sequences per step (default {train.batch_size})"
    )
    p.add_argument("--lr", type=float, help=f"Adam learning rate before the cosine decay (default {train.lr:g})")
    p.add_argument(
        "--minutes",
        type=float,
        help="training time budget in minutes (the amount of training then depends on the machine's speed)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="validation rounds to train for" + (f" (default {train.epochs})" if train.epochs else ""),
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, dropout and data order (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = pick by timing steps (default)")
    p.add_argument("--name", help="bundle name (default <data>-<cell>)")
    p.add_argument("--out", default="models", help="model directory the bundle goes under (default models)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``lm``, ``classifier`` and ``study`` under ``seqserve export``."""
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    lm_train = LMTrainConfig()
    lm = sub.add_parser(
        "lm",
        help="byte-level language model",
        description="Train a byte-level language model "
        f"with truncated BPTT and write it as a bundle. Default: the docs corpus, {lm_train.steps:,} "
        "seeded steps, so every run gives the same model.",
    )
    lm.add_argument("--corpus", default="docs", help="docs, stdlib, or a UTF-8 text file or folder (default docs)")
    _common(lm, "lstm", default_lm_model(), lm_train)
    lm.add_argument(
        "--steps",
        type=int,
        help=f"training steps, one BPTT chunk each (default {lm_train.steps} "
        "unless --epochs or --minutes is given; given together, the first to run out ends training)",
    )
    lm.add_argument("--bptt", type=int, help=f"steps per truncated-BPTT chunk (default {lm_train.bptt})")
    lm.add_argument(
        "--epoch-chunks",
        type=int,
        help=f"BPTT chunks between validations, 0 = a full pass (default {lm_train.epoch_chunks})",
    )
    lm.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        help="training arithmetic; auto = bf16 where the CPU has it (default auto)",
    )
    cls = sub.add_parser(
        "classifier",
        help="streaming sequence classifier",
        description="Train a classifier "
        "that predicts a label after every step; default data: scikit-learn's 8x8 digits.",
    )
    cls.add_argument("--data", default="digits", help='digits, or a JSONL file of {"text": ..., "label": ...} lines')
    cls.add_argument("--val-data", help="JSONL validation file (default: hold out part of --data per label)")
    cls_train = ClassifierTrainConfig()
    _common(cls, "gru", default_classifier_model("tokens", 256, 2), cls_train)
    cls.add_argument(
        "--early-weight",
        type=float,
        help=f"loss weight of the steps before the last (default {cls_train.early_weight})",
    )
    cls.add_argument(
        "--max-len", type=int, help=f"bytes kept from the start of each text (default {cls_train.max_len})"
    )
    from .study import add_study_arguments

    study = sub.add_parser(
        "study",
        help="long-range study: rnn vs lstm vs gru on synthetic tasks",
        description="Compare plain RNN, LSTM and GRU on the adding problem and the copy task.",
    )
    add_study_arguments(study)


def _apply(target, args: argparse.Namespace, mapping: dict[str, str]) -> None:
    for arg, attr in mapping.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(target, attr, value)


_MODEL_ARGS = {"layers": "layers", "hidden": "hidden_size", "embedding": "embedding_size", "dropout": "dropout"}
_TRAIN_ARGS = {
    "batch_size": "batch_size",
    "lr": "lr",
    "minutes": "minutes",
    "epochs": "epochs",
    "seed": "seed",
    "threads": "threads",
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def _check(*configs) -> None:
    for config in configs:
        try:
            config.validate()
        except ValueError as exc:
            raise CommandError(str(exc)) from None


def _progress(args, config):
    from .loop import Progress

    return Progress(config.log_seconds, enabled=not args.quiet)


def _write(model, args, name: str, kind: str, history, labels, data: dict, metrics: dict, plot) -> Bundle:
    from .package import write_bundle
    from .parity import ParityError

    with tempfile.TemporaryDirectory(prefix="seqserve-export-") as tmp:
        curves = plot(Path(tmp) / "curves.png")
        history_file = Path(tmp) / "history.json"
        history_file.write_text(json.dumps(history.to_dict(), indent=1) + "\n", encoding="utf-8")
        try:
            return write_bundle(
                model,
                args.out,
                name,
                kind,
                labels=labels,
                data=data,
                metrics=metrics,
                extra_files={"curves.png": curves, "history.json": history_file},
            )
        except ParityError as exc:
            raise CommandError(f"export failed its parity check: {exc}", 1) from None
        except OSError as exc:
            raise CommandError(f"cannot write the bundle under {args.out}: {exc.strerror or exc}", 1) from None


def lm_train_config(args: argparse.Namespace) -> LMTrainConfig:
    """The LM's training settings from the command line: the default step count unless a budget is given."""
    config = LMTrainConfig()
    if any(getattr(args, name, None) is not None for name in _BUDGET_ARGS):
        config.steps = config.epochs = config.minutes = None  # only the budgets given apply
    _apply(config, args, {**_TRAIN_ARGS, "steps": "steps", "bptt": "bptt", "precision": "precision"})
    if getattr(args, "epoch_chunks", None) is not None:
        config.epoch_chunks = args.epoch_chunks or None
    return config


def run_lm(args: argparse.Namespace) -> int:
    from .baselines import compressor_baselines
    from .data import load_corpus, split_corpus
    from .loop import parameter_count
    from .plot import plot_lm
    from .train import TrainingError, train_lm

    model_config = default_lm_model(args.cell)
    _apply(model_config, args, _MODEL_ARGS)
    config = lm_train_config(args)
    _check(model_config, config)
    try:
        corpus = load_corpus(args.corpus)
        train_bytes, val_bytes = split_corpus(corpus.data)
        model, history = train_lm(model_config, config, train_bytes, val_bytes, progress=_progress(args, config))
    except (DataError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    data_name = corpus.name if corpus.name in ("docs", "stdlib") else Path(corpus.name).stem
    name = args.name or f"{_slug(data_name)}-{args.cell}"
    baselines = compressor_baselines(train_bytes, val_bytes)
    best = history.best_row()
    metrics = {
        "val_bits_per_byte": round(best["val_bits_per_byte"], 4),
        **baselines,
        "train_bits_per_byte": round(best["train_bits_per_byte"], 4),
        "train_seconds": history.seconds,
        "epochs": history.epochs,
        "best_epoch": history.best_epoch,
        "steps": history.steps,
        "bytes_trained": history.samples,
        "params": parameter_count(model),
        "threads": history.threads,
        "stopped_by": history.stopped_by,
    }
    training = {**config.to_dict(), "precision_used": "bf16" if config.use_bf16() else "fp32"}
    data = {
        **corpus.describe(),
        "train_bytes": len(train_bytes),
        "val_bytes": len(val_bytes),
        "split": "last 10% of the bytes held out (contiguous tail; seed-independent)",
        "seed": config.seed,
        "training": training,
    }
    title = f"{name}: {model_config.cell} {model_config.layers}x{model_config.hidden_size} on {corpus.name}"
    bundle = _write(
        model,
        args,
        _slug(name),
        "lm",
        history,
        None,
        data,
        metrics,
        lambda path: plot_lm(history, path, title, baselines),
    )
    print(f"wrote {bundle.path}")
    print(
        f"validation {metrics['val_bits_per_byte']:.3f} bits/byte (zlib {baselines['zlib_bits_per_byte']:.3f}, "
        f"xz {baselines['xz_bits_per_byte']:.3f}) after {history.steps:,} steps, {history.epochs} epochs, "
        f"{history.seconds:.0f}s"
    )
    return 0


def run_classifier(args: argparse.Namespace) -> int:
    from .classify_data import load_digits_data, load_jsonl_data
    from .loop import parameter_count
    from .plot import plot_classifier
    from .train import TrainingError
    from .train_classifier import train_classifier

    config = ClassifierTrainConfig()
    _apply(config, args, {**_TRAIN_ARGS, "early_weight": "early_weight", "max_len": "max_len"})
    probe = default_classifier_model("tokens", 256, 2, args.cell)  # validated before any data is read
    _apply(probe, args, _MODEL_ARGS)
    _check(probe, config)
    try:
        if args.data == "digits":
            if args.val_data:
                raise DataError("--val-data is only for JSONL data")
            data = load_digits_data(config.seed, config.val_fraction)
        else:
            val_path = Path(args.val_data) if args.val_data else None
            data = load_jsonl_data(Path(args.data), config.seed, config.val_fraction, config.max_len, val_path)
        model_config = default_classifier_model(data.input_kind, data.input_dim, len(data.labels), args.cell)
        _apply(model_config, args, _MODEL_ARGS)
        model, history = train_classifier(model_config, config, data, progress=_progress(args, config))
    except (DataError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    name = args.name or f"{_slug(Path(data.name).stem)}-{args.cell}"
    best = history.best_row()
    metrics = {
        "val_accuracy": round(best["val_accuracy"], 4),
        "val_loss": round(best["val_loss"], 4),
        "train_accuracy": round(best["train_accuracy"], 4),
        "chance_accuracy": round(_chance(data), 4),
        "train_seconds": history.seconds,
        "epochs": history.epochs,
        "best_epoch": history.best_epoch,
        "steps": history.steps,
        "params": parameter_count(model),
        "threads": history.threads,
        "stopped_by": history.stopped_by,
    }
    described = {**data.describe(), "seed": config.seed, "training": config.to_dict()}
    title = f"{name}: {model_config.cell} {model_config.layers}x{model_config.hidden_size} on {data.name}"
    bundle = _write(
        model,
        args,
        _slug(name),
        "classifier",
        history,
        data.labels,
        described,
        metrics,
        lambda path: plot_classifier(history, path, title),
    )
    print(f"wrote {bundle.path}")
    print(
        f"validation accuracy {metrics['val_accuracy']:.3f} (chance {metrics['chance_accuracy']:.3f}) "
        f"after {history.seconds:.0f}s, {history.epochs} epochs"
    )
    return 0


def _chance(data) -> float:
    """Accuracy of always answering the most common validation label."""
    counts = data.val.targets.bincount(minlength=len(data.labels))
    return float(counts.max()) / len(data.val)


def run(args: argparse.Namespace) -> int:
    """Entry point called by ``seqserve export``."""
    if args.task == "study":
        from .study import run_study

        return run_study(args)
    try:
        return run_lm(args) if args.task == "lm" else run_classifier(args)
    except FileExistsError as exc:
        raise CommandError(str(exc), 1) from None
    except KeyboardInterrupt:
        print("\ninterrupted; no bundle written", file=sys.stderr)
        return 130
