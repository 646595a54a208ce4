"""What a step returns: parse an OutputSpec once, then render results for a whole batch at once.

The logits of a batch are reduced with vectorised numpy (log-softmax, top-k, argmax, softmax,
sampling) per distinct output plan, and only the requested values are put into each StepOutput.
The default is small (top-5 ids and log-probs of the last position): full logits are sent only
when asked for.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .domain import PACKED_OUTPUTS, OutputSpec, StepAnswers, StepOutput
from .errors import Reason, invalid
from .sampling import SamplingParams, check_sampling, sample

DEFAULT_TOP_K = 5


class OutputPlan(NamedTuple):
    """A parsed OutputSpec (hashable, so a batch groups its items by plan)."""

    top_k: int = DEFAULT_TOP_K
    logits: bool = False
    argmax: bool = False
    probs: bool = False
    sample: SamplingParams | None = None
    all_positions: bool = False
    none: bool = False

    @property
    def needs_rng(self) -> bool:
        return self.sample is not None and self.sample.temperature > 0


DEFAULT_PLAN = OutputPlan()
NONE_PLAN = OutputPlan(top_k=0, none=True)
# A regressor's outputs are values, not a distribution: by default it returns them raw.
REGRESSOR_PLAN = OutputPlan(top_k=0, logits=True)


def default_plan(regressor: bool, width: int) -> OutputPlan:
    """What a step without an OutputSpec returns: the same plan as an empty OutputSpec (top-k at
    most the model's width)."""
    if regressor:
        return REGRESSOR_PLAN
    return DEFAULT_PLAN if width >= DEFAULT_TOP_K else OutputPlan(top_k=width)


def parse_output(spec: OutputSpec, width: int, regressor: bool = False) -> OutputPlan:
    """Turn an OutputSpec into a plan; raise INVALID_ARGUMENT for contradictions."""
    if regressor and (spec.top_k or spec.argmax or spec.probs or spec.sample is not None):
        raise invalid(
            Reason.INVALID_OUTPUT_SPEC,
            "this model is a regressor: its outputs are values, not a distribution; "
            "ask for output.logits (the default) instead of top_k, argmax, probs or sample",
        )
    sampling = check_sampling(spec.sample, width) if spec.sample is not None else None
    others = spec.top_k or spec.logits or spec.argmax or spec.probs or sampling is not None
    if spec.none:
        if others or spec.all_positions:
            raise invalid(
                Reason.INVALID_OUTPUT_SPEC,
                "output.none asks for nothing but the position; leave the other output fields unset",
            )
        return NONE_PLAN
    if regressor:
        return OutputPlan(0, True, all_positions=spec.all_positions)
    top_k = min(int(spec.top_k), width) if others else min(DEFAULT_TOP_K, width)
    plan = OutputPlan(top_k, spec.logits, spec.argmax, spec.probs, sampling, spec.all_positions)
    return DEFAULT_PLAN if plan == DEFAULT_PLAN else plan


def top_k_rows(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids [n, k] sorted by descending logit, and their log-probabilities.

    Small k over many rows: k rounds of argmax (much faster than argpartition along axis 1, see
    docs/bench.md); a few rows or a large k: argpartition.
    """
    n, width = rows.shape
    if n == 1 and k < width:  # one row: 1-D calls are cheaper
        row = rows[0]
        part = np.argpartition(row, width - k)[width - k :]
        vals = row[part]
        order = vals.argsort()[::-1]
        top = vals[order]
        log_norm = top[0] + np.log(np.exp(row - top[0]).sum())
        return part[order][None, :], (top - log_norm)[None, :]
    r = _arange(n)
    if k >= width:
        ids = np.argsort(rows, axis=1)[:, ::-1]
    elif n > 4 and k <= 16:
        work = rows.copy()
        ids = np.empty((n, k), np.intp)
        for j in range(k):
            best = work.argmax(axis=1)
            ids[:, j] = best
            work[r, best] = -np.inf
    else:
        part = np.argpartition(rows, width - k, axis=1)[:, width - k :]
        order = np.argsort(rows[r[:, None], part], axis=1)[:, ::-1]
        ids = part[r[:, None], order]
    top = rows[r[:, None], ids]
    peak = top[:, :1]
    log_norm = peak + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True))
    return ids, top - log_norm


_ARANGES: dict[int, np.ndarray] = {}


def _arange(n: int) -> np.ndarray:
    r = _ARANGES.get(n)
    if r is None:
        r = _ARANGES[n] = np.arange(n)
    return r


def softmax_rows(rows: np.ndarray) -> np.ndarray:
    e = np.exp(rows - rows.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


def _fields(
    plan: OutputPlan, rows: np.ndarray, uniforms: np.ndarray | None, top: tuple | None = None
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if plan.top_k:
        out["top_k_ids"], out["top_k_logprobs"] = top if top is not None else top_k_rows(rows, plan.top_k)
    if plan.argmax:
        out["argmax"] = rows.argmax(axis=1)
    if plan.probs:
        out["probs"] = softmax_rows(rows)
    if plan.logits:
        out["logits"] = rows
    if plan.sample is not None:
        n = rows.shape[0]
        s = plan.sample
        u = uniforms if uniforms is not None else np.zeros(n)
        out["sampled"] = sample(rows, np.full(n, s.temperature), np.full(n, s.top_k), np.full(n, s.top_p), u)
    return out


def render_last(
    plan: OutputPlan,
    rows: np.ndarray,
    items: list,
    width: int,
    uniforms: np.ndarray | None = None,
    top: tuple | None = None,
) -> StepAnswers:
    """The answers of ``items`` from their last-position logits ``rows`` [len(items), width], as
    columns; ``top``: the rows' top-``plan.top_k`` (ids, log-probs) when the model run computed
    them already."""
    ids = [it.session.id for it in items]
    tags = [it.tag for it in items]
    positions = [it.end for it in items]
    if plan.none:
        return StepAnswers(ids, tags, positions, 0, 0, {})
    return StepAnswers(ids, tags, positions, 1, width, _fields(plan, rows, uniforms, top))


def render_all(plan: OutputPlan, rows: np.ndarray, item, width: int, uniforms: np.ndarray | None = None) -> StepOutput:
    """One answer covering every position of one item: ``rows`` is [positions, width]."""
    f = _fields(plan, rows, uniforms)
    values = {
        name: (v.astype(np.float32, copy=False).tobytes() if name in PACKED_OUTPUTS else v.ravel().tolist())
        for name, v in f.items()
    }
    return StepOutput(item.session.id, item.tag, item.end, rows.shape[0], width, values)
