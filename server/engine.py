"""The engine: sessions, validation and scheduling for every loaded model, in domain terms.

It takes and returns the plain objects of domain.py and raises ServeError (errors.py); it knows
nothing of gRPC or protobuf. The gRPC servicer (server/api/) converts to and from ``seqserve.v1``,
and tests and benchmarks drive the engine directly::

    engine = Engine(ServerConfig(models="models"))
    engine.load()                      # load bundles (one runtime + scheduler per model version)
    await engine.start()               # inside a running event loop: start schedulers and the TTL sweeper
    view = engine.create_session("lm-lstm")
    out = await engine.step(StepRequest(view.session_id, tokens=[72, 105]))
    async for chunk in engine.generate(GenerateRequest(view.session_id, max_tokens=64)): ...
    await engine.stop()

Every request is checked completely before it is queued, so a bad one fails alone (ServeError
with a precise reason) and never joins, or poisons, a batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

from .config import ServerConfig
from .domain import (
    GenerateChunk,
    GenerateRequest,
    ModelFacts,
    OutputSpec,
    SessionView,
    StepBlock,
    StepOutput,
    StepRequest,
)
from .errors import Reason, ServeError, invalid, unavailable
from .generation import MAX_TOKENS_PER_MESSAGE, new_seed
from .naive import NaiveScheduler
from .outputs import OutputPlan
from .registry import ModelVersion, Registry
from .requests import check_block, check_input
from .sampling import check_sampling
from .scheduler import Scheduler
from .session import Session
from .session_table import SessionTable
from .work import ErrorItem, GenItem, GenSink, StepItem, StepSink, UnarySink

log = logging.getLogger("seqserve.server")
MAX_STOPS, MAX_STOP_BYTES = 16, 256


def retry_key(tokens: tuple, features: bytes, output: OutputSpec | None) -> tuple:
    """What a resend of a step with expected_position must repeat to be answered again."""
    return (tokens, features, output)


class Engine:
    """All serving logic behind the API. Not thread-safe: use it from one event loop."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.registry = Registry(config.models, config.device, config.intra_op_threads, config.initial_slots)
        self.table = SessionTable(config)
        self.schedulers: dict[str, Scheduler | NaiveScheduler] = {}  # by model key
        self.loaded = False  # every model bundle is loaded (requests before that are told to retry)
        self.closing = False
        self._direct = True  # a lone step may run at once (False while a packed message is submitted)
        self._sweeper: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> Engine:
        kind = Scheduler if self.config.batching == "on" else NaiveScheduler
        for model in self.registry.load_all():
            self.schedulers[model.key] = kind(model, model.runtime, self.config)
        self.loaded = True
        return self

    async def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()
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

    @property
    def idle(self) -> bool:
        """No queued steps and no running generations on any model."""
        return all(s.idle for s in self.schedulers.values())

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, let queued steps and generations finish; True if all did in time."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.idle:
                return True
            await asyncio.sleep(0.01)
        return False

    async def stop(self) -> None:
        """Stop at once: work still queued or running (drain first to let it finish) fails with
        SHUTTING_DOWN, so no caller waits on it forever."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for s in list(self.table.sessions.values()):
            if not s.idle:
                self.table.end(s, "shutdown")
        for scheduler in self.schedulers.values():
            await scheduler.stop()

    def scheduler(self, model: ModelVersion) -> Scheduler | NaiveScheduler:
        return self.schedulers[model.key]

    # -- models and sessions -------------------------------------------------------------------
    def list_models(self) -> list[ModelFacts]:
        cfg = self.config
        return [
            ModelFacts(
                **facts, max_tokens_per_step=cfg.max_tokens_per_step, max_generate_tokens=cfg.max_generate_tokens
            )
            for facts in self.registry.describe()
        ]

    def create_session(self, model: str, version: int = 0, session_id: str = "") -> SessionView:
        if self.closing:
            raise unavailable("server is shutting down")
        if not self.loaded:
            raise unavailable(
                "server is still loading its models; retry when its health reports SERVING", Reason.STARTING
            )
        if not model:
            raise invalid(Reason.MODEL_REQUIRED, "name the model to start a session on (see ListModels)")
        return self.view(self.table.create(self.registry.get(model, version), session_id))

    def get_session(self, session_id: str) -> SessionView:
        return self.view(self.table.get(session_id))

    def close_session(self, session_id: str) -> int:
        s = self.table.get(session_id)
        running = self.table.end(s, "closed")
        if running is not None:
            self.scheduler(s.model).cancel(running)
        return s.position

    def reset_session(self, session_id: str) -> SessionView:
        s = self.table.get(session_id)
        s.reset(self.table.clock())
        self.table.touch(s, s.last_used)
        return self.view(s)

    def view(self, s: Session) -> SessionView:
        return SessionView(
            s.id,
            s.model.name,
            s.model.version,
            s.position,
            int(s.created * 1000),
            int(s.last_used * 1000),
            int(self.table.expires_at(s) * 1000),
            s.generating is not None,
        )

    def _session(self, session_id: str) -> Session:
        s = self.table.sessions.get(session_id)
        if s is None:
            raise self.table.missing(session_id)
        if self.closing:
            raise unavailable("server is shutting down; retry on another replica or after restart")
        return s

    # -- steps ---------------------------------------------------------------------------------
    def submit_step(self, req: StepRequest, sink: StepSink) -> None:
        """Validate a step and queue it; its answer (or run error) goes to ``sink``."""
        s = self._session(req.session_id)
        model = s.model
        n, x = check_input(model, req.tokens, req.features, self.config.max_tokens_per_step)
        plan = model.default_plan if req.output is None else model.plan(req.output)
        key = None
        if req.expected_position is not None:
            key = retry_key(tuple(req.tokens), req.features, req.output)
        sent = s.check_step(req.expected_position, key)
        if sent is not None:  # a resend of the step just taken: answer it again, advance nothing
            if sent.result is not None:
                sink.push(sent.answer_again(req.tag))
            else:
                sent.followers = (sent.followers or []) + [(sink, req.tag)]
            return
        item = StepItem(s, n, x, plan, req.tag, sink, s.queued, key)
        s.queue_step(item)
        self.table.touch(s, self.table.clock())
        self.scheduler(model).enqueue(s, item, self._direct)

    def submit_stream_step(self, req: StepRequest, sink: StepSink) -> None:
        """Like submit_step, but a refusal becomes an error answer in the sink, in session order."""
        try:
            self.submit_step(req, sink)
        except ServeError as err:
            self._refuse_stream_step(req.session_id, req.tag, err, sink)

    def _refuse_stream_step(self, session_id: str, tag: int, err: ServeError, sink: StepSink) -> None:
        s = self.table.sessions.get(session_id)
        if s is not None and s.pending:
            item = ErrorItem(sink, session_id, tag, err)
            if s.queue_refusal(item):
                self.scheduler(s.model).enqueue(s, item)
                return
        sink.push_error(session_id, tag, err)

    def submit_stream_steps(
        self, reqs: Iterable[StepRequest], sink: StepSink, blocks: Iterable[StepBlock] = ()
    ) -> None:
        """Submit many steps together (a packed message): ``reqs``, then each block's rows, each as
        submit_stream_step does. None of them runs before all are queued, so they share the
        scheduler's next runs instead of the first one running alone."""
        self._direct = False
        try:
            for req in reqs:
                self.submit_stream_step(req, sink)
            for block in blocks:
                self._submit_block(block, sink)
        finally:
            self._direct = True

    def _submit_block(self, block: StepBlock, sink: StepSink) -> None:
        try:
            check_block(block)
        except ServeError as err:
            tags = block.tags
            for i, sid in enumerate(block.session_ids):
                self._refuse_stream_step(sid, tags[i] if i < len(tags) else 0, err, sink)
            return
        if block.lengths is not None:
            for req in block.requests():
                self.submit_stream_step(req, sink)
            return
        # One token per row, the common case: the rows that pass submit_step's checks on sight are
        # queued here without a StepRequest each; any other row (a refusal, a retry, an output spec
        # that fails to parse) takes submit_stream_step, which answers it as a StepRequest is.
        sessions, closing, output = self.table.sessions, self.closing, block.output
        tags, expected, tokens = block.tags, block.expected, block.tokens
        per_model: dict[ModelVersion, tuple] = {}  # model -> (its plan for ``output`` or None, its scheduler)
        touch, now = self.table.touch, self.table.clock()
        for i, sid in enumerate(block.session_ids):
            s = sessions.get(sid)
            t = tokens[i]
            at = expected[i] if expected is not None else None
            if s is not None and not closing and s.generating is None and (at is None or at == s.queued):
                model = s.model
                known = per_model.get(model)
                if known is None:
                    known = per_model[model] = (self._plan_or_none(model, output), self.scheduler(model))
                plan, scheduler = known
                if plan is not None and model.tokens and 0 <= t < model.vocab:
                    key = None if at is None else retry_key((t,), b"", output)
                    item = StepItem(s, 1, t, plan, tags[i], sink, s.queued, key)
                    s.queue_step(item)
                    touch(s, now)
                    scheduler.enqueue(s, item, False)
                    continue
            self.submit_stream_step(StepRequest(sid, (t,), b"", output, at, tags[i]), sink)

    @staticmethod
    def _plan_or_none(model: ModelVersion, output: OutputSpec | None) -> OutputPlan | None:
        try:
            return model.default_plan if output is None else model.plan(output)
        except ServeError:
            return None

    async def step(self, req: StepRequest) -> StepOutput:
        """One step; raises ServeError for a refused or failed step."""
        sink = UnarySink(asyncio.get_running_loop())
        self.submit_step(req, sink)
        return await sink.future

    # -- generation ----------------------------------------------------------------------------
    def submit_generate(self, req: GenerateRequest, sink: GenSink) -> GenItem:
        s = self._session(req.session_id)
        model, cfg = s.model, self.config
        if not model.can_generate:
            raise invalid(
                Reason.NOT_GENERATIVE,
                f"model {model.key} is a {model.manifest.kind} over "
                f"{model.manifest.input_kind}; Generate needs a language model over tokens (use Step)",
                model=model.key,
            )
        n, prompt = check_input(model, req.prompt, b"", cfg.max_tokens_per_step) if len(req.prompt) else (0, None)
        if not 1 <= req.max_tokens <= cfg.max_generate_tokens:
            raise invalid(
                Reason.INVALID_MAX_TOKENS,
                f"max_tokens must be between 1 and {cfg.max_generate_tokens} "
                f"(max_generate_tokens), got {req.max_tokens}",
                limit=cfg.max_generate_tokens,
            )
        params = check_sampling(req.sampling, model.width)
        stops = [bytes(x) for x in req.stops]
        if stops:
            if len(stops) > MAX_STOPS or any(not 0 < len(x) <= MAX_STOP_BYTES for x in stops):
                raise invalid(
                    Reason.INVALID_STOP, f"give at most {MAX_STOPS} stop sequences of 1-{MAX_STOP_BYTES} bytes each"
                )
            if model.width > 256:
                raise invalid(
                    Reason.INVALID_STOP,
                    f"stop sequences are bytes; model {model.key} has {model.width} token ids, not a byte vocabulary",
                )
        s.check_generate(req.expected_position, prompt is not None)
        per_msg = min(req.tokens_per_message or cfg.generate_tokens_per_message, req.max_tokens, MAX_TOKENS_PER_MESSAGE)
        item = GenItem(
            s, n, prompt, params, new_seed(params.seed), req.max_tokens, stops or None, per_msg, sink, s.queued
        )
        s.queue_generation(item)
        self.table.touch(s, self.table.clock())
        self.scheduler(model).enqueue(s, item)
        return item

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Async iterator of chunks; raises ServeError (before or during)."""
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
            s = item.session
            if not sink.done:
                self.scheduler(s.model).cancel(item)
            if not s.ended:  # a generation's end, finished or cancelled, is a use of its session
                self.table.touch(s, self.table.clock())

    # -- accounting ----------------------------------------------------------------------------
    def state_bytes(self) -> int:
        return sum(m.runtime.store.state_bytes() for m in self.registry.all())
