"""Sessions: who they are, where their state lives, and when they end.

A session pins one model version and one state slot. The table enforces the session limits
(total and per model), evicts the least recently used idle session when full (or refuses), expires
sessions idle longer than the TTL, and remembers recently ended ids so a late request is told the
session expired, was evicted or was closed, and when, instead of silently starting from zero.
A session with work queued, a generation running or a model run in progress is never idle.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict, deque

from .config import ServerConfig
from .errors import already_exists, exhausted, invalid, not_found

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def new_session_id() -> str:
    """22 unguessable URL-safe characters (128 random bits), starting with a letter or digit like a
    client-chosen id: an id starting with '-' reads as an option on a command line."""
    while True:
        session_id = secrets.token_urlsafe(16)
        if session_id[0].isalnum():
            return session_id


class Session:
    """One sequence's server-side record. Plain slots: the hot path reads and writes these."""

    __slots__ = ("id", "model", "slot", "position", "queued", "created", "last_used", "pending", "in_ready",
                 "busy", "generating", "ended", "last_start", "last_key", "last_item")

    def __init__(self, session_id: str, model, slot: int, now: float):
        self.id = session_id
        self.model = model  # the ModelVersion it is pinned to
        self.slot = slot  # row in the model's state slabs
        self.position = 0  # tokens/frames consumed (applied)
        self.queued = 0  # position once every queued step is applied (what new steps are checked against)
        self.created = now
        self.last_used = now
        self.pending: deque = deque()  # work items in arrival order; the head is next to run
        self.in_ready = False  # listed in its scheduler's ready queue
        self.busy = False  # inside a model run right now
        self.generating = None  # the running/queued generation, if any
        self.ended: str | None = None  # "closed", "expired", "evicted" once it is gone
        self.last_start = -1  # retry detection: start position and input key of the last keyed step
        self.last_key = None
        self.last_item = None

    @property
    def idle(self) -> bool:
        return not self.pending and self.generating is None and not self.busy

    def release_slot(self) -> None:
        """Give the state slot back (once; an ended session's slot may be freed after its last run)."""
        if self.slot >= 0:
            self.model.runtime.store.release(self.slot)
            self.slot = -1


class SessionTable:
    """All open sessions, in least-recently-used order, plus a bounded record of ended ones."""

    def __init__(self, config: ServerConfig, clock=time.time):
        self.config = config
        self.clock = clock
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.ended: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.counts = {"evicted": 0, "expired": 0, "closed": 0}

    def __len__(self) -> int:
        return len(self.sessions)

    # -- lifecycle -----------------------------------------------------------------------------
    def create(self, model, session_id: str = "") -> Session:
        if session_id:
            if not _ID_RE.match(session_id):
                raise invalid(f"session id {session_id[:40]!r} must be 1-128 characters of letters, digits and . _ : @ -, "
                              "starting with a letter or digit")
            if session_id in self.sessions:
                raise already_exists(f"session {session_id!r} already exists")
        else:
            session_id = new_session_id()
        self._make_room(model)
        now = self.clock()
        session = Session(session_id, model, model.runtime.store.alloc(), now)
        self.sessions[session_id] = session
        self.ended.pop(session_id, None)
        model.sessions += 1
        return session

    def _make_room(self, model) -> None:
        cfg = self.config
        while True:
            if len(self.sessions) >= cfg.max_sessions:
                limit, same_model = f"max_sessions={cfg.max_sessions}", False
            elif model.sessions >= cfg.max_sessions_per_model:
                limit, same_model = f"max_sessions_per_model={cfg.max_sessions_per_model} on {model.key}", True
            else:
                return
            if cfg.when_full == "refuse":
                raise exhausted(f"session limit reached ({limit}); close sessions or raise the limit")
            victim = next((s for s in self.sessions.values() if s.idle and (not same_model or s.model is model)), None)
            if victim is None:
                raise exhausted(f"session limit reached ({limit}) and every session is busy; retry later")
            self.end(victim, "evicted")

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise self.missing(session_id)
        return session

    def missing(self, session_id: str):
        record = self.ended.get(session_id)
        if record is None:
            return not_found(f"no session {session_id[:128]!r}; create one first")
        return self._gone(session_id, *record)

    def _gone(self, session_id: str, reason: str, when: float):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
        detail = {"expired": f"after {self.config.idle_ttl_s:g} s idle",
                  "evicted": "to make room for a new session (least recently used idle session)",
                  "closed": "by a CloseSession call"}.get(reason, "")
        return not_found(f"session {session_id!r} {'was ' if reason != 'expired' else ''}{reason} at {stamp} {detail}; "
                         "its state is gone, create a new session")

    def touch(self, session: Session, now: float) -> None:
        session.last_used = now
        self.sessions.move_to_end(session.id)

    def end(self, session: Session, reason: str) -> None:
        """Remove a session: fail its queued work, free its slot, remember why it ended."""
        if session.ended:
            return
        session.ended = reason
        now = self.clock()
        del self.sessions[session.id]
        model = session.model
        model.sessions -= 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        model.scheduler.abandon(session, self._gone(session.id, reason, now))
        if not session.busy:  # else the scheduler frees it when the run in progress is over
            session.release_slot()
        if self.config.ended_record:
            self.ended[session.id] = (reason, now)
            while len(self.ended) > self.config.ended_record:
                self.ended.popitem(last=False)

    def sweep(self) -> int:
        """End every session idle for longer than the TTL; return how many."""
        ttl = self.config.idle_ttl_s
        if not ttl:
            return 0
        deadline = self.clock() - ttl
        stale = []
        for session in self.sessions.values():  # least recently used first
            if session.last_used > deadline:
                break
            if session.idle:
                stale.append(session)
        for session in stale:
            self.end(session, "expired")
        return len(stale)

    def expires_at(self, session: Session) -> float:
        return session.last_used + self.config.idle_ttl_s if self.config.idle_ttl_s else 0.0
