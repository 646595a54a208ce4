"""Training and validation curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from .loop import History


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lm(history: History, path: Path | str, title: str, baselines: dict[str, float] | None = None) -> Path:
    """Bits per byte against bytes trained on: training (windowed) and validation (per epoch),
    with the compressors' figures on the same held-out text as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if history.train:
        ax.plot(
            [r["samples"] / 1e6 for r in history.train],
            [r["bits_per_byte"] for r in history.train],
            color="tab:blue",
            alpha=0.6,
            label="train",
        )
    ax.plot(
        [r["samples"] / 1e6 for r in history.val],
        [r["val_bits_per_byte"] for r in history.val],
        "o-" if len(history.val) <= 30 else "-",
        color="tab:orange",
        label="validation",
    )
    best = history.best_row()
    if best:
        ax.plot(
            [best["samples"] / 1e6],
            [best["val_bits_per_byte"]],
            "*",
            color="black",
            markersize=12,
            label=f"kept: epoch {best['epoch']} ({best['val_bits_per_byte']:.3f})",
        )
    lines = (("zlib_bits_per_byte", "zlib -9", "tab:red"), ("xz_bits_per_byte", "xz -9e", "tab:green"))
    for key, label, color in lines:
        if baselines and key in baselines:
            ax.axhline(baselines[key], linestyle="--", color=color, label=f"{label} ({baselines[key]:.2f})")
    if history.best_value is not None:
        ax.set_ylim(
            max(0.0, min(history.best_value, *(baselines or {}).values()) - 0.3),
            max(r["val_bits_per_byte"] for r in history.val[:2]) + 0.3,
        )
    ax.set_xlabel("bytes trained on (millions)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_classifier(history: History, path: Path | str, title: str) -> Path:
    """Loss and last-step accuracy per epoch, training and validation side by side."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    epochs = [r["epoch"] for r in history.val]
    left.plot(epochs, [r["train_loss"] for r in history.val], label="train (incl. earlier steps)")
    left.plot(epochs, [r["val_loss"] for r in history.val], label="validation (last step)")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    right.plot(epochs, [r["train_accuracy"] for r in history.val], label="train")
    right.plot(epochs, [r["val_accuracy"] for r in history.val], label="validation")
    right.axvline(history.best_epoch, linestyle=":", color="gray", label=f"kept (epoch {history.best_epoch})")
    right.set_xlabel("epoch")
    right.set_ylabel("last-step accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
