"""Running generations as one vectorised cohort: one array row per generating session.

After its prompt is fed, a generation joins its scheduler's cohort. Every tick the whole cohort
is fed its last sampled tokens in runs of up to ``max_batch`` rows, then the next tokens are drawn
for all rows at once and written into a token buffer; Python touches a row only when it sends a
message (every ``per_msg`` tokens or ``flush_s``), hits a stop sequence or finishes. A row whose
last token was sampled stays one more tick so that token is fed too: the session's state then
includes every generated token.

While its membership does not change, the cohort keeps its rows' recurrent state itself (dense
``[layers, rows, hidden]`` per run, on the model's device) and feeds it straight back: nothing is
gathered from or scattered to the slabs per token. Before rows join or leave, the state is
written back to the slabs (``sync``) and read again at the next run.

Each row draws its uniforms from a counter-based generator (SplitMix64 of seed and draw index),
so a seeded generation produces the same tokens whatever else shares its batches.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from .domain import FinishReason, GenerateChunk
from .sampling import sample

MAX_TOKENS_PER_MESSAGE = 256
# Up to this many rows, a run's draws go row by row on scalars (greedy rows without stop
# sequences), which costs less than the array path's fixed dozen numpy calls for so few rows
# (docs/bench.md, "Settings chosen by measurement").
SCALAR_ROWS = 8
_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def uniforms(seed: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) draws, one per row: a pure function of (seed, counter)."""
    with np.errstate(over="ignore"):
        z = seed + (counter.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def new_seed(seed: int | None) -> int:
    return (seed if seed is not None else secrets.randbits(64)) & 0xFFFFFFFFFFFFFFFF


class Cohort:
    """The active generations of one model version (rows stay aligned across all arrays)."""

    _ARRAYS = (
        "slots",
        "x",
        "count",
        "limit",
        "temp",
        "top_k",
        "top_p",
        "seed",
        "nbuf",
        "per_msg",
        "flushed_at",
        "final",
        "has_stops",
    )

    def __init__(self, runtime: Any, flush_s: float, stats: Any):
        self.runtime = runtime
        self.stats = stats  # its scheduler's SchedulerStats: tokens sampled are counted there
        self.store = runtime.store
        self.flush_s = flush_s
        self.items: list = []
        self.state: Any = None  # per run chunk: its rows' dense state, while membership holds
        self.chunks: list[tuple[int, int]] = []
        self.last: Any = None  # each row's latest logits (written to the store on leaving)
        self.slots = np.empty(0, np.intp)  # state slot
        self.x = np.empty(0, np.int64)  # next input: the last sampled token, not yet fed
        self.count = np.empty(0, np.int64)  # tokens sampled
        self.limit = np.empty(0, np.int64)  # max_tokens
        self.temp = np.empty(0, np.float64)
        self.top_k = np.empty(0, np.int64)
        self.top_p = np.empty(0, np.float64)
        self.seed = np.empty(0, np.uint64)
        self.nbuf = np.empty(0, np.int64)  # tokens waiting in `tokens`
        self.per_msg = np.empty(0, np.int64)
        self.flushed_at = np.empty(0, np.float64)
        self.final = np.empty(0, bool)  # the last token is sampled: feed it, then finish
        self.has_stops = np.empty(0, bool)
        self.tokens = np.empty((0, MAX_TOKENS_PER_MESSAGE), np.int32)
        self.cancelled: list = []  # items to drop at the next tick (set from outside)

    def __len__(self) -> int:
        return len(self.items)

    def prepare(self, limit: int) -> list[tuple[int, int]]:
        """The run chunks (row ranges of at most ``limit``), with their dense state loaded."""
        if self.state is None:
            total = len(self.items)
            self.chunks = [(lo, min(lo + limit, total)) for lo in range(0, total, limit)]
            self.state = [self.store.read(self.slots[lo:hi]) for lo, hi in self.chunks]
        return self.chunks

    def sync(self) -> None:
        """Write the dense state back to the slabs before membership changes."""
        if self.state is not None:
            for (lo, hi), state in zip(self.chunks, self.state):
                self.store.write(self.slots[lo:hi], state)
            self.state = None

    def admit(self, gens: list, rows: np.ndarray, now: float) -> None:
        """Add generations whose prompt is fed; ``rows`` are the logits to draw their first token from."""
        self.sync()
        start = len(self.items)
        self.last = rows.copy() if self.last is None else np.concatenate([self.last, rows])
        n = len(gens)
        self.items.extend(gens)
        add = {
            "slots": [g.session.slot for g in gens],
            "x": [0] * n,
            "count": [0] * n,
            "limit": [g.max_tokens for g in gens],
            "temp": [g.params.temperature for g in gens],
            "top_k": [g.params.top_k for g in gens],
            "top_p": [g.params.top_p for g in gens],
            "seed": [g.seed for g in gens],
            "nbuf": [0] * n,
            "per_msg": [g.per_msg for g in gens],
            "flushed_at": [now] * n,
            "final": [False] * n,
            "has_stops": [g.stops is not None for g in gens],
        }
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.asarray(add[name], old.dtype)
            setattr(self, name, np.concatenate([old, new]) if start else new)
        fresh = np.zeros((n, MAX_TOKENS_PER_MESSAGE), np.int32)
        self.tokens = np.concatenate([self.tokens, fresh]) if start else fresh
        for g in gens:
            g.session.join_cohort()  # its slot is in every cohort run
        if n <= SCALAR_ROWS:
            self._draw_few(list(range(start, start + n)), rows, now)
        else:
            self._draw(np.arange(start, start + n), rows, now)

    def fed(self, lo: int, hi: int, logits: np.ndarray, now: float) -> list:
        """Rows lo..hi were just fed their token (``logits`` [hi-lo, width]); return the rows that
        finished (their last token is now fed)."""
        self.last[lo:hi] = logits
        if hi - lo <= SCALAR_ROWS:  # a few rows (a lone generation, every token): scalar checks, no masks
            done = [r for r in range(lo, hi) if self.final[r]]
            if not done:
                self._draw_few(list(range(lo, hi)), logits, now)
            elif len(done) < hi - lo:
                left = [j for j in range(hi - lo) if not self.final[lo + j]]
                self._draw_few([lo + j for j in left], logits[left], now)
            return done
        final = self.final[lo:hi]
        done = []
        if final.any():
            for i in np.flatnonzero(final) + lo:
                done.append(int(i))
            live = np.flatnonzero(~final)
            self._draw(live + lo, logits[live], now)
        else:
            self._draw(np.arange(lo, hi), logits, now)
        return done

    def _draw(self, rows: np.ndarray, logits: np.ndarray, now: float) -> None:
        if not len(rows):
            return
        temp = self.temp[rows]
        if temp.any():
            u = uniforms(self.seed[rows], self.count[rows])
            tokens = sample(logits, temp, self.top_k[rows], self.top_p[rows], u)
        else:
            tokens = logits.argmax(axis=1)
        self.x[rows] = tokens
        self.stats.generated += len(rows)
        count = self.count[rows] + 1
        self.count[rows] = count
        nbuf = self.nbuf[rows]
        self.tokens[rows, nbuf] = tokens
        nbuf += 1
        self.nbuf[rows] = nbuf
        final = count >= self.limit[rows]
        stops = self.has_stops[rows]
        if stops.any():
            for j in np.flatnonzero(stops & ~final):
                g = self.items[rows[j]]
                token = int(tokens[j])
                if token < 256:
                    g.generated.append(token)
                    if any(g.generated.endswith(stop) for stop in g.stops):
                        final[j] = True
                        g.reason = FinishReason.STOP
        self.final[rows] = final
        flush = ~final & ((nbuf >= self.per_msg[rows]) | (now - self.flushed_at[rows] >= self.flush_s))
        for j in np.flatnonzero(flush):
            self._send(int(rows[j]), now)

    def _draw_few(self, rows: list[int], logits: np.ndarray, now: float) -> None:
        """``_draw`` for a few rows, none final (``logits`` [len(rows), width]): greedy rows without
        stop sequences on scalars. A small cohort (and the naive loop) draws every token here, and
        each generation its first, where the array path's dozen numpy calls on arrays of a few
        elements cost several times the argmaxes themselves."""
        other = []
        for j, r in enumerate(rows):
            if not self.temp[r] and not self.has_stops[r]:
                self._took(r, [int(logits[j].argmax())], now)
            else:
                other.append(j)
        if other:
            self._draw(np.asarray(rows)[other], logits[other], now)

    def greedy_span(self, lo: int, hi: int) -> int:
        """How many runs rows lo..hi may take back to back, each fed the argmaxes of the one before
        (``drew_greedy`` records them), before one of them has a message due or its last token: 0
        unless every row is greedy, without stop sequences and not final."""
        span = MAX_TOKENS_PER_MESSAGE
        for r in range(lo, hi):  # scalars: this is for a few rows, where masks cost more
            if self.temp[r] or self.has_stops[r] or self.final[r]:
                return 0
            span = min(span, self.per_msg[r] - self.nbuf[r], self.limit[r] - self.count[r])
        return int(span)

    def drew_greedy(self, lo: int, hi: int, drawn: list[np.ndarray], logits: np.ndarray, now: float) -> None:
        """Record the tokens rows lo..hi drew in runs back to back (at most ``greedy_span``):
        ``drawn`` holds each run's argmaxes, ``logits`` [hi-lo, width] the last run's."""
        self.last[lo:hi] = logits
        for j in range(hi - lo):
            self._took(lo + j, [int(tokens[j]) for tokens in drawn], now)

    def _took(self, r: int, tokens: list[int], now: float) -> None:
        """Row ``r`` drew ``tokens`` (greedy, no stop sequences; after the first, at most
        ``greedy_span`` of them): count them, buffer them, send its message when one is due."""
        k = len(tokens)
        self.x[r] = tokens[-1]
        self.stats.generated += k
        count = int(self.count[r]) + k
        self.count[r] = count
        nbuf = int(self.nbuf[r])
        if k == 1:  # a scalar store costs a quarter of a one-element slice's
            self.tokens[r, nbuf] = tokens[0]
        else:
            self.tokens[r, nbuf : nbuf + k] = tokens
        nbuf += k
        self.nbuf[r] = nbuf
        final = count >= self.limit[r]
        self.final[r] = final
        if not final and (nbuf >= self.per_msg[r] or now - self.flushed_at[r] >= self.flush_s):
            self._send(r, now)

    def _send(self, row: int, now: float, finish: FinishReason | None = None) -> None:
        g = self.items[row]
        n = int(self.nbuf[row])
        sampled = g.start + g.prompt_len + int(self.count[row])  # position once every sampled token is fed
        tokens = self.tokens[row, :n].tolist()
        if finish is not None:
            g.sink.finish(GenerateChunk(tokens, sampled, finish))
        else:
            g.session.generated(sampled - 1)  # the newest token is not fed yet
            g.sink.emit(GenerateChunk(tokens, sampled))
        self.nbuf[row] = 0
        self.flushed_at[row] = now

    def finish(self, rows: list, now: float) -> list:
        """Send the last message of each finished row (its last token is fed); drop the rows.
        Returns the sessions that left the cohort."""
        for row in rows:
            g = self.items[row]
            if not g.cancelled:
                self._send(row, now, g.reason)
        return self._drop(rows, fed_last=True)

    def drop_cancelled(self) -> list:
        """Remove rows whose generation was cancelled or whose session ended, without feeding them."""
        if not self.cancelled:
            return []
        ids = {id(g) for g in self.cancelled}
        self.cancelled.clear()
        rows = [i for i, g in enumerate(self.items) if id(g) in ids]
        # the sampled-but-unfed token is dropped: the position counts fed tokens only
        return self._drop(rows, fed_last=False)

    def _drop(self, rows: list, fed_last: bool) -> list:
        if not rows:
            return []
        self.sync()
        # a later Generate without prompt continues from here
        self.store.set_last_logits(self.slots[rows], self.last[rows])
        ends = [
            (self.items[r], self.items[r].start + self.items[r].prompt_len + int(self.count[r]) - (not fed_last))
            for r in rows
        ]
        gone = [self.items[r] for r in rows]
        if len(rows) == len(self.items):  # all of them (a lone generation, every call): no masks
            kept: Any = slice(0, 0)
            self.items = []
        else:
            kept = np.ones(len(self.items), bool)
            kept[rows] = False
            self.items = [g for g, k in zip(self.items, kept) if k]
        self.last = self.last[kept]
        for name in self._ARRAYS:
            setattr(self, name, getattr(self, name)[kept])
        self.tokens = self.tokens[kept]
        for g, position in ends:
            g.session.end_generation(g, position)
        return [g.session for g in gone]
