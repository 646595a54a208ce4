"""The engine: sessions, validation and scheduling for every loaded model, without any gRPC.

The servicer is a thin layer over this class, and benchmarks drive it directly::

    engine = Engine(ServerConfig(models="models"))
    engine.load()                      # load bundles (one runtime + scheduler per model version)
    await engine.start()               # inside a running event loop: start schedulers and the TTL sweeper
    info = engine.create_session("lm-lstm")
    result = await engine.step(pb.StepRequest(session_id=info.session_id, tokens=[72, 105]))
    async for msg in engine.generate(pb.GenerateRequest(session_id=..., max_tokens=64)): ...
    await engine.stop()

Every request is checked completely before it is queued, so a bad one fails alone (ServeError
with a precise status) and never joins, or poisons, a batch.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from seqserve.v1 import seqserve_pb2 as pb

from .config import ServerConfig
from .errors import ServeError, invalid, precondition, unavailable
from .outputs import parse_output, retagged
from .naive import NaiveScheduler
from .registry import Registry
from .generation import MAX_TOKENS_PER_MESSAGE, new_seed
from .sampling import check_sampling
from .scheduler import Scheduler
from .sessions import Session, SessionTable
from .work import ErrorItem, GenItem, GenSink, StepItem, UnarySink

log = logging.getLogger("seqserve.server")
MAX_STOPS, MAX_STOP_BYTES = 16, 256


class Engine:
    """All serving logic behind the API. Not thread-safe: use it from one event loop."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.registry = Registry(config.models, config.device, config.intra_op_threads, config.initial_slots)
        self.table = SessionTable(config)
        self.closing = False
        self._sweeper: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> "Engine":
        kind = Scheduler if self.config.batching == "on" else NaiveScheduler
        for model in self.registry.load_all():
            model.scheduler = kind(model, self.config)
        return self

    async def start(self) -> None:
        for model in self.registry.all():
            model.scheduler.start()
        if self.config.idle_ttl_s:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="session sweeper")

    async def _sweep_forever(self) -> None:
        period = min(max(self.config.idle_ttl_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            try:
                self.table.sweep()
            except Exception:
                log.exception("session sweeper failed")

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, let queued steps and generations finish; True if all did in time."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(m.scheduler.idle for m in self.registry.all()):
                return True
            await asyncio.sleep(0.01)
        return False

    async def stop(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for model in self.registry.all():
            await model.scheduler.stop()

    # -- models and sessions -------------------------------------------------------------------
    def list_models(self) -> pb.ListModelsResponse:
        limits = dict(max_tokens_per_step=self.config.max_tokens_per_step,
                      max_generate_tokens=self.config.max_generate_tokens)
        return pb.ListModelsResponse(models=[pb.ModelInfo(**facts, **limits) for facts in self.registry.describe()])

    def create_session(self, model: str, version: int = 0, session_id: str = "") -> pb.SessionInfo:
        if self.closing:
            raise unavailable("server is shutting down")
        if not model:
            raise invalid("name the model to start a session on (see ListModels)")
        return self.info(self.table.create(self.registry.get(model, version), session_id))

    def get_session(self, session_id: str) -> pb.SessionInfo:
        return self.info(self.table.get(session_id))

    def close_session(self, session_id: str) -> int:
        s = self.table.get(session_id)
        self.table.end(s, "closed")
        return s.position

    def reset_session(self, session_id: str) -> pb.SessionInfo:
        s = self.table.get(session_id)
        if not s.idle:
            what = "a generation is running" if s.generating is not None else f"{len(s.pending)} step(s) are queued"
            raise precondition(f"session {session_id!r} is busy ({what}); reset it once they complete")
        s.model.runtime.store.zero(s.slot)
        s.position = s.queued = 0
        s.last_key = s.last_item = None
        self.table.touch(s, self.table.clock())
        return self.info(s)

    def info(self, s: Session) -> pb.SessionInfo:
        return pb.SessionInfo(session_id=s.id, model=s.model.name, version=s.model.version, position=s.position,
                              created_unix_ms=int(s.created * 1000), last_used_unix_ms=int(s.last_used * 1000),
                              expires_unix_ms=int(self.table.expires_at(s) * 1000),
                              generating=s.generating is not None)

    def _session(self, session_id: str) -> Session:
        s = self.table.sessions.get(session_id)
        if s is None:
            raise self.table.missing(session_id)
        if self.closing:
            raise unavailable("server is shutting down; retry on another replica or after restart")
        return s

    # -- steps ---------------------------------------------------------------------------------
    def submit_step(self, req: pb.StepRequest, sink) -> None:
        """Validate a step and queue it; its result (or run error) goes to ``sink``."""
        s = self._session(req.session_id)
        model = s.model
        n, x = self._input(model, req.tokens, req.features)
        plan = parse_output(req.output, model.width, model.regressor) if req.HasField("output") else model.default_plan
        if s.generating is not None:
            raise precondition(f"session {s.id!r} is generating; send steps after its Generate call finishes")
        key = None
        if req.HasField("expected_position"):
            expected = req.expected_position
            key = (tuple(req.tokens), req.features, req.output.SerializeToString(deterministic=True))
            if expected != s.queued:
                if expected == s.last_start and key == s.last_key:
                    self._replay(s.last_item, sink, req.tag)
                    return
                queued = f" ({s.queued - s.position} of them queued)" if s.queued != s.position else ""
                raise precondition(f"expected position {expected} but session {s.id!r} is at position {s.queued}{queued}")
        item = StepItem(s, n, x, plan, req.tag, sink, s.queued, key)
        if key is not None:
            s.last_start, s.last_key, s.last_item = s.queued, key, item
        s.queued += n
        table = self.table
        s.last_used = table.clock()
        table.sessions.move_to_end(s.id)
        model.scheduler.enqueue(s, item)

    @staticmethod
    def _replay(item: StepItem, sink, tag: int) -> None:
        """A retry of the step already taken: answer it again without advancing the state."""
        if item.result is not None:
            sink.push(retagged(item.result, tag))
        else:
            item.followers = (item.followers or []) + [(sink, tag)]

    def submit_stream_step(self, req: pb.StepRequest, sink) -> None:
        """Like submit_step, but a refusal becomes an error result in the sink, in session order."""
        try:
            self.submit_step(req, sink)
        except ServeError as err:
            s = self.table.sessions.get(req.session_id)
            if s is not None and s.pending:
                s.model.scheduler.enqueue(s, ErrorItem(sink, req.session_id, req.tag, err))
            else:
                sink.push_error(req.session_id, req.tag, err)

    async def step(self, req: pb.StepRequest) -> pb.StepResult:
        """One step; raises ServeError for a refused or failed step."""
        sink = UnarySink(asyncio.get_running_loop())
        self.submit_step(req, sink)
        return await sink.future

    def _input(self, model, tokens, features: bytes) -> tuple[int, object]:
        cfg = self.config
        if model.tokens:
            if features:
                raise invalid(f"model {model.key} takes token ids in `tokens`, not `features`")
            n = len(tokens)
            if n == 1:
                t = tokens[0]
                if not 0 <= t < model.vocab:
                    raise invalid(f"token id {t} is outside the vocabulary of {model.key} (0..{model.vocab - 1})")
                return 1, t
            if n == 0:
                raise invalid("empty step: give at least one token")
            if n > cfg.max_tokens_per_step:
                raise invalid(f"a step may carry at most {cfg.max_tokens_per_step} tokens (max_tokens_per_step), got {n}; split it")
            x = np.array(tokens, np.int64)
            bad = (x < 0) | (x >= model.vocab)
            if bad.any():
                i = int(np.argmax(bad))
                raise invalid(f"token id {int(x[i])} at index {i} is outside the vocabulary of {model.key} (0..{model.vocab - 1})")
            return n, x
        if len(tokens):
            raise invalid(f"model {model.key} takes float32 frames in `features`, not token ids")
        size = len(features)
        if size == 0:
            raise invalid("empty step: give at least one feature frame")
        if size % model.frame_bytes:
            raise invalid(f"features are {size} bytes, not a whole number of frames: model {model.key} takes "
                          f"{model.frame_bytes // 4} float32 values ({model.frame_bytes} bytes) per frame")
        n = size // model.frame_bytes
        if n > cfg.max_tokens_per_step:
            raise invalid(f"a step may carry at most {cfg.max_tokens_per_step} frames (max_tokens_per_step), got {n}; split it")
        x = np.frombuffer(features, "<f4").astype(np.float32).reshape(n, model.frame_bytes // 4)
        if not np.isfinite(x).all():
            raise invalid("features contain NaN or infinity")
        return n, x

    # -- generation ----------------------------------------------------------------------------
    def submit_generate(self, req: pb.GenerateRequest, sink: GenSink) -> GenItem:
        s = self._session(req.session_id)
        model, cfg = s.model, self.config
        if not model.can_generate:
            raise invalid(f"model {model.key} is a {model.manifest.kind} over {model.manifest.input_kind}; "
                          "Generate needs a language model over tokens (use Step)")
        n, prompt = self._input(model, req.prompt, b"") if len(req.prompt) else (0, None)
        if not 1 <= req.max_tokens <= cfg.max_generate_tokens:
            raise invalid(f"max_tokens must be between 1 and {cfg.max_generate_tokens} (max_generate_tokens), got {req.max_tokens}")
        params = check_sampling(req.sampling, model.width)
        stops = [bytes(x) for x in req.stop]
        if stops:
            if len(stops) > MAX_STOPS or any(not 0 < len(x) <= MAX_STOP_BYTES for x in stops):
                raise invalid(f"give at most {MAX_STOPS} stop sequences of 1-{MAX_STOP_BYTES} bytes each")
            if model.width > 256:
                raise invalid(f"stop sequences are bytes; model {model.key} has {model.width} token ids, not a byte vocabulary")
        if s.generating is not None:
            raise precondition(f"session {s.id!r} is already generating")
        if req.HasField("expected_position") and req.expected_position != s.queued:
            raise precondition(f"expected position {req.expected_position} but session {s.id!r} is at position {s.queued}")
        if prompt is None and s.queued == 0:
            raise precondition(f"session {s.id!r} is at position 0: give a prompt (there is no previous step to continue from)")
        per_msg = min(req.tokens_per_message or cfg.generate_tokens_per_message, req.max_tokens, MAX_TOKENS_PER_MESSAGE)
        item = GenItem(s, n, prompt, params, new_seed(params.seed), req.max_tokens, stops or None, per_msg, sink, s.queued)
        s.generating = item
        s.last_key = s.last_item = None
        self.table.touch(s, self.table.clock())
        model.scheduler.enqueue(s, item)
        return item

    async def generate(self, req: pb.GenerateRequest):
        """Async iterator of GenerateResponse messages; raises ServeError (before or during)."""
        sink = GenSink()
        item = self.submit_generate(req, sink)
        loop = asyncio.get_running_loop()
        try:
            while True:
                while sink.out:
                    yield sink.out.popleft()
                if sink.done:
                    if sink.error is not None:
                        raise sink.error
                    return
                sink.waiter = loop.create_future()
                await sink.waiter
        finally:
            if not sink.done:
                item.session.model.scheduler.cancel(item)
            elif not item.session.ended:
                self.table.touch(item.session, self.table.clock())

    # -- accounting ----------------------------------------------------------------------------
    def state_bytes(self) -> int:
        return sum(m.runtime.store.state_bytes() for m in self.registry.all())
