"""The table of open sessions: ids, limits, least-recently-used order, expiry, and what ended.

A session pins one model version and one state slot (session.py holds its lifecycle). The table
enforces the session limits (total and per model), evicts the least recently used idle session
when full (or refuses), expires sessions idle longer than the TTL, and remembers recently ended
ids so a late request is told the session expired, was evicted or was closed, and when, instead
of silently starting from zero. A session with work queued, a generation running or a model run
in progress is never idle, so it is never evicted or expired.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter, OrderedDict
from typing import Any

from .config import ServerConfig
from .errors import Reason, ServeError, already_exists, exhausted, invalid, not_found, unavailable
from .session import Session
from .stats import AGE_BOUNDS, Histogram
from .work import GenItem

_GONE = {"expired": Reason.SESSION_EXPIRED, "evicted": Reason.SESSION_EVICTED, "closed": Reason.SESSION_CLOSED}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def new_session_id() -> str:
    """22 unguessable URL-safe characters (128 random bits), starting with a letter or digit like a
    client-chosen id: an id starting with '-' reads as an option on a command line."""
    while True:
        session_id = secrets.token_urlsafe(16)
        if session_id[0].isalnum():
            return session_id


class SessionTable:
    """All open sessions, in least-recently-used order, plus a bounded record of ended ones."""

    def __init__(self, config: ServerConfig, clock=time.time):
        self.config = config
        self.clock = clock
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.ended: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.counts = {"evicted": 0, "expired": 0, "closed": 0, "shutdown": 0}
        self.per_model: Counter[str] = Counter()  # open sessions by model key
        # for metrics: sessions created by model key, ended by (model key, reason), age at end
        self.created: Counter[str] = Counter()
        self.ended_by: Counter[tuple[str, str]] = Counter()
        self.ages: dict[tuple[str, str], Histogram] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    # -- lifecycle -----------------------------------------------------------------------------
    def create(self, model: Any, session_id: str = "") -> Session:
        if session_id:
            if not _ID_RE.match(session_id):
                raise invalid(
                    Reason.INVALID_SESSION_ID,
                    f"session id {session_id[:40]!r} must be 1-128 characters of letters, digits and . _ : @ -, "
                    "starting with a letter or digit",
                )
            if session_id in self.sessions:
                raise already_exists(
                    Reason.SESSION_EXISTS, f"session {session_id!r} already exists", session_id=session_id
                )
        else:
            session_id = new_session_id()
        self._make_room(model)
        session = Session(session_id, model, model.runtime.store, self.clock())
        self.sessions[session_id] = session
        self.ended.pop(session_id, None)
        self.per_model[model.key] += 1
        self.created[model.key] += 1
        return session

    def _make_room(self, model: Any) -> None:
        cfg = self.config
        while True:
            if len(self.sessions) >= cfg.max_sessions:
                setting, limit, same_model = "max_sessions", cfg.max_sessions, False
            elif self.per_model[model.key] >= cfg.max_sessions_per_model:
                setting, limit, same_model = "max_sessions_per_model", cfg.max_sessions_per_model, True
            else:
                return
            where = f" on {model.key}" if same_model else ""
            if cfg.when_full == "refuse":
                raise exhausted(
                    Reason.SESSION_LIMIT,
                    f"session limit reached ({setting}={limit}{where}); close sessions or raise the limit",
                    setting=setting,
                    limit=limit,
                )
            victim = next((s for s in self.sessions.values() if s.idle and (not same_model or s.model is model)), None)
            if victim is None:
                raise exhausted(
                    Reason.ALL_SESSIONS_BUSY,
                    f"session limit reached ({setting}={limit}{where}) and every session is busy; retry later",
                    setting=setting,
                    limit=limit,
                )
            self.end(victim, "evicted")

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise self.missing(session_id)
        return session

    def missing(self, session_id: str) -> ServeError:
        record = self.ended.get(session_id)
        if record is None:
            return not_found(
                Reason.SESSION_NOT_FOUND,
                f"no session {session_id[:128]!r}; create one first",
                session_id=session_id[:128],
            )
        return self._gone(session_id, *record)

    def _gone(self, session_id: str, reason: str, when: float) -> ServeError:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
        detail = {
            "expired": f"after {self.config.idle_ttl_s:g} s idle",
            "evicted": "to make room for a new session (least recently used idle session)",
            "closed": "by a CloseSession call",
        }.get(reason, "")
        return not_found(
            _GONE[reason],
            f"session {session_id!r} {'was ' if reason != 'expired' else ''}{reason} at {stamp} {detail}; "
            "its state is gone, create a new session",
            session_id=session_id,
            ended_at=stamp,
        )

    def touch(self, session: Session, now: float) -> None:
        session.touch(now)
        self.sessions.move_to_end(session.id)

    def end(self, session: Session, reason: str) -> GenItem | None:
        """Remove a session (its queued work fails, its slot is freed) and remember why it ended.
        Returns a generation still running in a cohort, for the engine to cancel."""
        if session.ended:
            return None
        now = self.clock()
        del self.sessions[session.id]
        key = (session.model.key, reason)
        self.per_model[key[0]] -= 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.ended_by[key] += 1
        ages = self.ages.get(key)
        if ages is None:
            ages = self.ages[key] = Histogram(AGE_BOUNDS)
        ages.observe(now - session.created)
        if reason == "shutdown":
            return session.end(reason, unavailable("the server stopped before this work ran"))
        running = session.end(reason, self._gone(session.id, reason, now))
        if self.config.ended_record:
            self.ended[session.id] = (reason, now)
            while len(self.ended) > self.config.ended_record:
                self.ended.popitem(last=False)
        return running

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
