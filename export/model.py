"""The recurrent model: embedding (or feature frames) -> LSTM/GRU/RNN -> per-step logits.

Contract shared with the ONNX graph and the server: ``forward(x, state) -> (logits, state)`` where
``state`` is a tuple of tensors shaped ``[layers, batch, hidden]`` (``(h,)`` for GRU/RNN,
``(h, c)`` for LSTM) and ``logits`` is ``[batch, seq, output_size]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ModelConfig:
    cell: str = "lstm"  # lstm | gru | rnn: the recurrence; rnn is the plain tanh cell
    input_kind: str = "tokens"  # tokens (byte ids) | features (float frames)
    input_dim: int = 256  # vocabulary size for tokens, frame width for features
    embedding_size: int = 64  # token embedding width; unused for features
    hidden_size: int = 256  # state width per layer: the memory a session carries
    layers: int = 2  # stacked recurrent layers
    dropout: float = 0.1  # between layers and before the output head, training only
    output_size: int = 256  # logits per step: vocabulary (lm) or classes (classifier)

    def validate(self) -> None:
        if self.cell not in ("lstm", "gru", "rnn"):
            raise ValueError(f"cell must be lstm, gru or rnn, got {self.cell!r}")
        if self.input_kind not in ("tokens", "features"):
            raise ValueError(f"input kind must be tokens or features, got {self.input_kind!r}")
        for name in ("input_dim", "hidden_size", "layers", "output_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.input_kind == "tokens" and self.embedding_size < 1:
            raise ValueError(f"embedding size must be at least 1, got {self.embedding_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        if config.input_kind == "tokens":
            self.embed: nn.Module = nn.Embedding(config.input_dim, config.embedding_size)
            rnn_input = config.embedding_size
        else:
            self.embed = nn.Identity()
            rnn_input = config.input_dim
        kwargs = {"nonlinearity": "tanh"} if config.cell == "rnn" else {}
        self.rnn = _CELLS[config.cell](
            rnn_input,
            config.hidden_size,
            num_layers=config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
            **kwargs,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.output_size)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.config.cell == "lstm" else ("h",)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        shape = (self.config.layers, batch, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.state_names)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        emb = self.embed(x)
        if self.config.cell == "lstm":
            out, (h, c) = self.rnn(emb, (state[0], state[1]))
            new_state: tuple[torch.Tensor, ...] = (h, c)
        else:
            out, h = self.rnn(emb, state[0])
            new_state = (h,)
        return self.head(self.drop(out)), new_state
