"""Drawing token ids from logits, vectorised over a batch of rows with per-row parameters.

Each row brings its own temperature, top-k, top-p and one uniform number drawn from that row's
own generator, so a seeded generation draws the same tokens whatever else shares its batch.
Temperature 0 is greedy (argmax); top_k 0 and top_p 0 or 1 mean no truncation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .domain import Sampling
from .errors import Reason, invalid


class SamplingParams(NamedTuple):
    temperature: float
    top_k: int
    top_p: float
    seed: int | None


GREEDY = SamplingParams(0.0, 0, 0.0, None)


def check_sampling(spec: Sampling, width: int) -> SamplingParams:
    """Validate sampling options; raise INVALID_ARGUMENT naming the bad field."""
    temperature, top_p = float(spec.temperature), float(spec.top_p)
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid(
            Reason.INVALID_SAMPLING,
            f"sampling temperature must be a finite number >= 0 (0 is greedy), got {temperature:g}",
            field="temperature",
        )
    if not math.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
        raise invalid(
            Reason.INVALID_SAMPLING,
            f"sampling top_p must be within [0, 1] (0 or 1: no nucleus cut), got {top_p:g}",
            field="top_p",
        )
    return SamplingParams(temperature, min(int(spec.top_k), width), top_p, spec.seed)


def sample(
    logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """One id per row of ``logits`` [rows, width]; the other arguments hold one value per row."""
    rows, width = logits.shape
    out = np.empty(rows, np.int64)
    greedy = temperature <= 0.0
    if greedy.any():
        out[greedy] = logits[greedy].argmax(axis=1)
        lazy = np.flatnonzero(~greedy)
        if lazy.size == 0:
            return out
        rest: np.ndarray | slice = lazy
        z = logits[rest] / temperature[rest, None].astype(np.float32)
    else:
        rest = slice(None)
        z = logits / temperature[:, None].astype(np.float32)
    k = top_k[rest]
    cut = np.flatnonzero((k > 0) & (k < width))
    for kk in np.unique(k[cut]):
        r = cut[k[cut] == kk]
        zr = z[r]
        kth = np.partition(zr, width - kk, axis=1)[:, width - kk]  # the kk-th largest per row
        zr[zr < kth[:, None]] = -np.inf
        z[r] = zr
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    tp = top_p[rest]
    nucleus = np.flatnonzero((tp > 0.0) & (tp < 1.0))
    if nucleus.size:
        pr = p[nucleus] / p[nucleus].sum(axis=1, keepdims=True)
        order = np.argsort(-pr, axis=1, kind="stable")
        sorted_p = np.take_along_axis(pr, order, axis=1)
        mass_before = np.cumsum(sorted_p, axis=1) - sorted_p
        sorted_p[mass_before >= tp[nucleus, None]] = 0.0  # keep the smallest prefix reaching top_p
        kept = np.zeros_like(pr)
        np.put_along_axis(kept, order, sorted_p, axis=1)
        p[nucleus] = kept
    cdf = np.cumsum(p, axis=1)
    # the first id whose cumulative mass exceeds u * total: never an id with zero probability
    picked = (cdf <= uniform[rest, None] * cdf[:, -1:]).sum(axis=1)
    out[rest] = np.minimum(picked, width - 1)
    return out
