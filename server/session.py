"""A session's life: the one place that changes a session's fields.

::

    created ──queue_step──► stepping ──(runs complete)──► idle ◄──┐
       │                       ▲  │                               │
       │                       │  └─queue_generation─► generating ┘ (end_generation)
       └──────────── reset (idle only) ──────────────────────────►  position 0
    any state ──end(closed | expired | evicted)──► ended (queued work failed, slot freed when no
                                                          run holds it)

Every transition is a method here; the engine, the scheduler, the generation cohorts and the naive
loop call them and never assign a session's fields themselves. Exactly-once lives here too: a step
that carries ``expected_position`` is checked against the position after everything already
queued (so clients may pipeline), and the last such step is remembered with its answer, so a
resend of it (same position, same input) gets the same answer without advancing the state again.
Later transitions (snapshot/restore, a change of owner) belong here as well.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .errors import Reason, ServeError, precondition
from .work import ErrorItem, GenItem, StepItem


class Session:
    """One sequence's server-side record. Plain slots: the hot path reads these directly."""

    __slots__ = (
        "id",
        "model",
        "store",
        "slot",
        "position",
        "queued",
        "created",
        "last_used",
        "pending",
        "in_ready",
        "busy",
        "generating",
        "ended",
        "_retry",
    )

    def __init__(self, session_id: str, model: Any, store: Any, now: float):
        self.id = session_id
        self.model = model  # the ModelVersion it is pinned to
        self.store = store  # that model's StateStore (runtime/base.py)
        self.slot = store.allocate()  # row in the store
        self.position = 0  # tokens/frames consumed (applied)
        self.queued = 0  # position once every queued step is applied (what new steps are checked against)
        self.created = now
        self.last_used = now
        self.pending: deque = deque()  # work items in arrival order; the head is next to run
        self.in_ready = False  # listed in its scheduler's ready queue (or, naive: its driver is running)
        self.busy = False  # inside a model run, or a row of a generation cohort
        self.generating: GenItem | None = None  # the queued or running generation
        self.ended: str | None = None  # "closed", "expired" or "evicted" once it is gone
        self._retry: StepItem | None = None  # the last step that carried expected_position

    @property
    def idle(self) -> bool:
        return not self.pending and self.generating is None and not self.busy

    # -- accepting work (engine) -----------------------------------------------------------------
    def check_step(self, expected: int | None, key: Any) -> StepItem | None:
        """May a step with this ``expected_position`` and input ``key`` be queued? None: yes, at
        ``queued``; a StepItem: it is a resend of that step, answer it again. Raises otherwise."""
        if self.generating is not None:
            raise precondition(
                Reason.SESSION_GENERATING,
                f"session {self.id!r} is generating; send steps after its Generate call finishes",
                session_id=self.id,
            )
        if expected is None or expected == self.queued:
            return None
        last = self._retry
        if last is not None and expected == last.start and key == last.key:
            return last
        raise self._mismatch(expected)

    def _mismatch(self, expected: int) -> ServeError:
        queued = f" ({self.queued - self.position} of them queued)" if self.queued != self.position else ""
        return precondition(
            Reason.POSITION_MISMATCH,
            f"expected position {expected} but session {self.id!r} is at position {self.queued}{queued}",
            expected=expected,
            actual=self.queued,
            applied=self.position,
        )

    def queue_step(self, item: StepItem) -> None:
        if item.key is not None:
            self._retry = item
        self.queued += item.n
        self.pending.append(item)

    def queue_refusal(self, item: ErrorItem) -> bool:
        """A refused stream step waits behind the steps queued before it, so the stream's answers
        stay in order, but not behind a generation (its messages go to its own call): it goes
        before one queued last. False: nothing is queued that it must wait for; answer it now."""
        pending = self.pending
        if pending and pending[-1] is self.generating:  # steps are refused after a generation
            if len(pending) == 1:
                return False
            pending.insert(len(pending) - 1, item)
            return True
        pending.append(item)
        return True

    def check_generate(self, expected: int | None, has_prompt: bool) -> None:
        if self.generating is not None:
            raise precondition(
                Reason.SESSION_GENERATING, f"session {self.id!r} is already generating", session_id=self.id
            )
        if expected is not None and expected != self.queued:
            raise self._mismatch(expected)
        if not has_prompt and self.queued == 0:
            raise precondition(
                Reason.NOTHING_TO_CONTINUE,
                f"session {self.id!r} is at position 0: give a prompt (there is no previous step to continue from)",
                session_id=self.id,
            )

    def queue_generation(self, g: GenItem) -> None:
        self.generating = g
        self._retry = None
        self.pending.append(g)

    def touch(self, now: float) -> None:
        self.last_used = now

    def reset(self, now: float) -> None:
        """Back to the model's initial state at position 0 (only when idle)."""
        if not self.idle:
            what = (
                "a generation is running" if self.generating is not None else f"{len(self.pending)} step(s) are queued"
            )
            raise precondition(
                Reason.SESSION_BUSY,
                f"session {self.id!r} is busy ({what}); reset it once they complete",
                session_id=self.id,
            )
        self.store.zero(self.slot)
        self.position = self.queued = 0
        self._retry = None
        self.last_used = now

    # -- scheduling (scheduler, naive loop) ------------------------------------------------------
    def enter_ready(self) -> None:
        self.in_ready = True

    def leave_ready(self) -> None:
        self.in_ready = False

    def deliver_refusals(self) -> None:
        """Answer the refused steps at the head of the queue (their turn has come)."""
        pending = self.pending
        while pending and type(pending[0]) is ErrorItem:
            pending.popleft().deliver()

    def begin_run(self) -> None:
        self.busy = True

    def end_run(self) -> bool:
        """The model run holding this session is over; True if it has queued work to schedule."""
        g = self.generating
        if g is not None and g.joined:
            return False  # a row of a generation cohort: the cohort hands it back when it ends
        self.busy = False
        if self.ended:
            if not self.pending:  # ended during the run: its slot was left for now
                self.release_slot()
            return False
        return bool(self.pending) and not self.in_ready

    def applied(self, n: int) -> None:
        """A run fed the head item's ``n`` positions."""
        self.position += n

    def answer(self, item: StepItem, result: Any) -> None:
        """The head step is done: send its answer (to resends of it too) and remember it for later ones."""
        self.answered(item, result, 0)
        item.sink.push(result)
        if item.followers:
            self.answer_resends(item)

    def answered(self, item: StepItem, result: Any, row: int) -> None:
        """The head step is done with ``result`` (its StepOutput, or the StepAnswers holding its
        answer at ``row``), which the caller sends to the item's sink, a run's rows together; then
        it answers resends waiting on it (``answer_resends``: a resend on the same stream second)."""
        self.pending.popleft()
        if item.key is not None:
            item.result = result
            item.row = row

    def answer_resends(self, item: StepItem) -> None:
        """Answer the resends of ``item`` that arrived while it was queued."""
        for sink, tag in item.followers:
            sink.push(item.answer_again(tag))
        item.followers = None

    def step_failed(self, item: StepItem, err: ServeError) -> None:
        """The head step's run failed: the state is unchanged, so the positions of the steps
        queued behind it shift back, and the work that was checked against the old position (steps
        with expected_position, a generation) is refused."""
        self.pending.popleft()
        self.queued -= item.n
        self._refuse(item, err)
        shift = item.n
        kept: list = []
        for later in self.pending:
            if type(later) is ErrorItem:
                kept.append(later)
                continue
            if type(later) is StepItem and later.key is None:
                later.start -= shift
                later.end -= shift
                kept.append(later)
                continue
            at = later.start - shift  # where it would start now: after the steps kept ahead of it
            refusal = precondition(
                Reason.EARLIER_STEP_FAILED,
                f"an earlier step failed; this work would start at position {at}, not {later.start}",
                expected=later.start,
                actual=at,
            )
            if type(later) is GenItem:  # it may have counted on the failed step (no prompt, expected position)
                later.cancelled = True
                later.sink.fail(refusal)
                self.generating = None
                continue
            kept.append(ErrorItem(later.sink, self.id, later.tag, refusal))  # answered in its turn
            self.queued -= later.n
            shift += later.n
            self._refuse(later, refusal, answer=False)
        self.pending.clear()
        self.pending.extend(kept)

    def _refuse(self, item: StepItem, err: ServeError, answer: bool = True) -> None:
        """``item`` will never run: answer it (unless a queued ErrorItem will) and every resend
        waiting on it with ``err``, and stop treating it as the step a resend may repeat."""
        if self._retry is item:
            self._retry = None
        if answer:
            item.sink.push_error(self.id, item.tag, err)
        if item.followers:
            for sink, tag in item.followers:
                sink.push_error(self.id, tag, err)
            item.followers = None

    # -- generation (scheduler, cohorts, naive loop) ---------------------------------------------
    def join_cohort(self) -> None:
        """Its generation's prompt is fed: the session is a row of a cohort until it ends."""
        self.busy = True

    def generated(self, position: int) -> None:
        """The cohort fed generated tokens up to ``position``."""
        self.position = position

    def end_generation(self, g: GenItem, position: int | None = None) -> None:
        """The generation is over (finished, cancelled or failed) at ``position`` (default: as is)."""
        if position is not None:
            self.position = position
        self.generating = None
        self.queued = self.position
        self.busy = False
        if self.pending and self.pending[0] is g:
            self.pending.popleft()

    # -- the end -----------------------------------------------------------------------------------
    def end(self, reason: str, err: ServeError) -> GenItem | None:
        """Closed, expired or evicted: fail its queued work with ``err`` and free its slot unless a
        run holds it. Returns a generation running in a cohort, for its scheduler to cancel."""
        if self.ended:
            return None
        self.ended = reason
        pending = self.pending
        head = pending[0] if pending else None
        # a run in progress completes; not an item running in pieces (chunks.py), which may be
        # anywhere in its input: it is refused now, and its piece in a run is then ignored
        keep = head if (self.busy and head is not None and getattr(head, "chunked", None) is None) else None
        running = None
        if type(head) is GenItem:
            head.sink.fail(err)
            if head.joined:
                running = head
            else:  # its prompt may be in a run right now: it must not join a cohort afterwards
                head.cancelled = True
        while pending:
            item = pending.popleft()
            if item is keep:
                continue
            if type(item) is ErrorItem:
                item.deliver()
            elif type(item) is GenItem:
                item.cancelled = True
                item.sink.fail(err)
            else:
                self._refuse(item, err)
        if keep is not None:
            pending.append(keep)
        else:
            self.generating = None
        if not self.busy:
            self.release_slot()
        return running

    def release_slot(self) -> None:
        """Give the state slot back (once)."""
        if self.slot >= 0:
            self.store.release(self.slot)
            self.slot = -1
