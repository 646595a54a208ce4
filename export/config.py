"""Training settings and the default model shapes, with the reason for each default.

Defaults for the language model were chosen by measurement on a 2-core CPU (see docs/export.md,
"Choosing the defaults"). The default LM run is bounded by a number of steps, not by wall time, so
that the same command gives the same model on a busy machine as on an idle one: only slower.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .model import ModelConfig

DEFAULT_LM_STEPS = 1500  # 10 validation rounds of 150 chunks; 6.1 MB of text, about 15 passes


@dataclass
class TrainConfig:
    """What every training loop shares."""

    minutes: float | None = None  # wall-clock budget; the amount of training then depends on the machine
    epochs: int | None = None  # validation rounds to run; None = until another budget ends
    steps: int | None = None  # optimizer updates to run; None = until another budget ends
    batch_size: int = 32  # LM: parallel byte streams; classifier: sequences per step
    lr: float = 2e-3  # Adam step size at the start of the cosine decay
    lr_floor: float = 0.1  # cosine decay ends at lr * lr_floor: the last minutes polish at a low rate
    warmup_steps: int = 0  # linear warm-up steps before the cosine decay
    clip: float = 1.0  # gradient-norm clip: keeps the recurrence from exploding on long chunks
    seed: int = 0  # seeds torch, numpy, random and the data order: without a time budget a run is reproducible
    # torch intra-op threads; 0 = time all cores against one and keep the faster. Chosen for speed, not
    # fixed for reproducibility: one and two threads trained bit-identical models (docs/export.md), and on
    # a busy machine the right count is many times faster. Where kernels split a sum by thread count,
    # only rounding differs.
    threads: int = 0
    log_seconds: float = 10.0  # interval between progress lines when stderr is not a terminal

    def validate(self) -> None:
        if self.minutes is None and self.epochs is None and self.steps is None:
            raise ValueError("give a number of steps or epochs, or a time budget (minutes)")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be positive, got {self.minutes:g}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr:g}")
        if not 0 <= self.lr_floor <= 1:
            raise ValueError(f"lr floor must be in [0, 1], got {self.lr_floor:g}")
        if self.warmup_steps < 0:
            raise ValueError(f"warm-up steps must be 0 or more, got {self.warmup_steps}")
        if not self.clip > 0:
            raise ValueError(f"gradient clip must be positive, got {self.clip:g}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (all cores) or more, got {self.threads}")

    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LMTrainConfig(TrainConfig):
    """Language model: truncated BPTT over parallel streams, state carried between chunks."""

    # A fixed number of updates, not minutes: every machine of a kind trains the same model. Sized to
    # take about five minutes on 2 idle cores and to land well below zlib (docs/export.md).
    steps: int | None = DEFAULT_LM_STEPS
    batch_size: int = 32  # streams; 64 is a little faster per byte on CPU but halves the updates per pass
    bptt: int = 128  # steps the gradient flows back through; 64 learned less per second in probes
    epoch_chunks: int | None = 150  # chunks per validation round: 10 validations in the default run
    val_streams: int = 16  # validation streams: few enough that their cold starts cost little
    lr: float = 6e-3  # high for Adam, but a short budget needs it: in probes 5e-3 reached with 0.7 MB
    # what 3e-3 reached with 1.3 MB; 8e-3 and 1.2e-2 spiked in some runs
    warmup_steps: int = 20  # with this high a rate, a short warm-up avoids early loss spikes
    precision: str = "auto"  # auto | bf16 | fp32: bf16 autocast trains 1.2-1.6x faster where the CPU has bf16

    def use_bf16(self) -> bool:
        """bf16 autocast for the forward pass (weights, optimizer and the exported model stay fp32)."""
        if self.precision == "auto":
            import torch

            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return self.precision == "bf16"

    def validate(self) -> None:
        super().validate()
        if self.bptt < 1:
            raise ValueError(f"bptt must be at least 1, got {self.bptt}")
        if self.epoch_chunks is not None and self.epoch_chunks < 1:
            raise ValueError(f"chunks per epoch must be at least 1, got {self.epoch_chunks}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.val_streams < 1:
            raise ValueError(f"validation streams must be at least 1, got {self.val_streams}")


@dataclass
class ClassifierTrainConfig(TrainConfig):
    """Sequence classifier: whole sequences, loss on the last step (plus a share on earlier steps)."""

    minutes: float | None = None
    epochs: int | None = 30  # digits: 1438 training sequences, a pass takes well under a second
    batch_size: int = 64
    lr: float = 3e-3
    early_weight: float = 0.1  # loss weight of earlier steps: the running prediction stays meaningful
    max_len: int = 512  # text: bytes kept from the start of each example (cost grows with length)
    val_fraction: float = 0.2  # held out per label by seed; digits gives about 360 validation images

    def validate(self) -> None:
        super().validate()
        if self.early_weight < 0:
            raise ValueError(f"early-step loss weight must be 0 or more, got {self.early_weight:g}")
        if self.max_len < 1:
            raise ValueError(f"max length must be at least 1, got {self.max_len}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"validation fraction must be in (0, 1), got {self.val_fraction:g}")


def default_lm_model(cell: str = "lstm") -> ModelConfig:
    """The default byte-level language model: one LSTM layer of 512.

    Measured on 2 CPU cores (docs corpus): 1x512 runs about 3x more updates per second than 2x512
    and, within a few minutes, learns more per update too (1 minute: 2.08 vs 2.80 bits/byte).
    2x256 and 2x384 were also behind at equal time. 512 is the widest layer whose default run (about
    fifteen passes over the corpus) still takes about five minutes on 2 cores; the server still
    carries a real state (h and c of 512 floats per session).
    """
    return ModelConfig(
        cell=cell,
        input_kind="tokens",
        input_dim=256,
        embedding_size=128,  # a small share of the cost next to the 512-wide recurrence
        hidden_size=512,  # the state a session carries; wider layers halve the updates per second
        layers=1,  # a second layer cost 3x the time per update and trailed at every point of a 5-minute run
        dropout=0.4,  # 10-30 passes over 420 KB overfit: 0.2 beat 0 (1.61 vs 1.65 bits/byte), and on an
        # idle machine 0.2 peaked at 1.65 halfway through 5 minutes while 0.4 reached 1.62 in 2.5 minutes
        output_size=256,
    )


def default_classifier_model(input_kind: str, input_dim: int, classes: int, cell: str = "gru") -> ModelConfig:
    """The default classifier: small, since digits and short texts need little state."""
    return ModelConfig(
        cell=cell,
        input_kind=input_kind,
        input_dim=input_dim,
        embedding_size=32,  # text classifier only: byte ids
        hidden_size=128,  # 8x8 digits reach high accuracy with this; more only slows training
        layers=1,  # one layer suffices for 8-step sequences
        dropout=0.1,  # digits has few examples: a little regularisation helps validation accuracy
        output_size=classes,
    )
