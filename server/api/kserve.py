"""The KServe v2 / Triton face of the engine: ``inference.GRPCInferenceService`` on the same port,
the same engine, sessions and batching as the native API.

Converting is kserve_convert's job and sequence bookkeeping kserve_sequences'; this module runs
the RPCs. ModelStreamInfer is read and written as StepStream is (servicer.py): a reader submits
each request without waiting for earlier ones, so the sequences sharing a stream run
concurrently, and a writer sends answers as they complete. Every request read from a stream is
answered exactly once, through ``InferStream.finish``, whether it ran or was refused before or by
the engine; a refusal is that answer's ``error_message`` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import time

import grpc

import seqserve
from seqserve.kserve import grpc_service_pb2 as pb
from seqserve.kserve import grpc_service_pb2_grpc as pb_grpc

from ..domain import StepOutput
from ..engine import Engine
from ..errors import ServeError
from ..placement import placement_for
from . import kserve_convert as kc
from .calls import CallCounts, unary
from .kserve_sequences import Sequence, SequenceTable
from .outbox import StreamOutbox
from .servicer import run_stream

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# What ServerMetadata advertises: the Triton extensions this server implements.
EXTENSIONS = ["model_configuration", "sequence", "sequence(string_id)", "statistics"]


class Counters:
    """Triton's per-model statistics of the requests served through this API."""

    __slots__ = ("success", "success_ns", "fail", "fail_ns", "inferences", "last_ms")

    def __init__(self) -> None:
        self.success = self.success_ns = self.fail = self.fail_ns = self.inferences = self.last_ms = 0

    def count(self, started_ns: int, positions: int, ok: bool) -> None:
        now = time.perf_counter_ns()
        if ok:
            self.success += 1
            self.success_ns += now - started_ns
            self.inferences += positions
        else:
            self.fail += 1
            self.fail_ns += now - started_ns
        self.last_ms = int(time.time() * 1000)


class InFlight:
    """A request read from a stream, until it is answered."""

    __slots__ = ("id", "model_name", "model_version", "started_ns", "model", "names", "seq")

    def __init__(self, request: pb.ModelInferRequest):
        self.id = request.id
        self.model_name = request.model_name
        self.model_version = request.model_version
        self.started_ns = time.perf_counter_ns()
        self.model: kc.ServedModel | None = None
        self.names: tuple[str, ...] = ()
        self.seq: Sequence | None = None


class InferStream(StreamOutbox):
    """One ModelStreamInfer call: its requests in flight and its answers waiting to be written. It
    is the engine's StepSink for every step submitted from the stream (``tag`` finds the request)."""

    __slots__ = ("servicer", "pending", "next_tag")

    def __init__(self, servicer: KServeServicer):
        super().__init__(servicer.calls, "ModelStreamInfer")
        self.servicer = servicer
        self.pending: dict[int, InFlight] = {}
        self.next_tag = 0

    def push(self, result: StepOutput) -> None:
        self.finish(self.pending.pop(result.tag), result, None)

    def push_error(self, session_id: str, tag: int, err: ServeError) -> None:
        self.finish(self.pending.pop(tag), None, err)

    def finish(self, req: InFlight, out: StepOutput | None, err: ServeError | None) -> None:
        """The one exit of every request read from the stream: its result ``out``, or ``err`` (a
        refusal of the request itself, of the sequence, or of the engine)."""
        seq = req.seq
        if seq is not None:
            if err is not None:
                err = self.servicer.sequences.refusal(seq, err)
            self.servicer.sequences.done(seq)
        model = req.model
        if err is None and out is not None and model is not None:
            message = kc.stream_response(model, req.id, req.names, out)
        else:
            text = err.message if err is not None else "internal error: no result"
            version = model.version_str if model is not None else req.model_version
            message = pb.ModelStreamInferResponse(
                error_message=text,
                infer_response=pb.ModelInferResponse(model_name=req.model_name, model_version=version, id=req.id),
            )
        if model is not None:
            self.servicer.counters(model).count(req.started_ns, out.steps if out is not None else 0, err is None)
        if err is None:
            self.calls.counts[self.ok] += 1
        else:
            self.calls.failed(self.rpc, err)
        self._queue(message)


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Implements inference.GRPCInferenceService on an Engine."""

    def __init__(self, engine: Engine, calls: CallCounts):
        self.engine = engine
        self.calls = calls  # request outcomes, for metrics (calls.py)
        self.sequences = SequenceTable(engine)
        self.streams: set[InferStream] = set()
        self.closing = False
        self._models: dict[tuple[str, str], kc.ServedModel] = {}  # (model_name, model_version) as sent
        self._served: dict[str, kc.ServedModel] = {}  # by model key
        self._counters: dict[str, Counters] = {}

    # -- models ------------------------------------------------------------------------------------
    def model(self, name: str, version: str) -> kc.ServedModel:
        """The model version a request names (empty version: the latest); raise MODEL_NOT_FOUND."""
        sm = self._models.get((name, version))
        if sm is None:
            sm = self.served(self.engine.registry.get(name, kc.parse_version(name, version)))
            if version in ("", sm.version_str):  # only the canonical spellings, so the cache stays small
                self._models[(name, version)] = sm
        return sm

    def served(self, model) -> kc.ServedModel:
        sm = self._served.get(model.key)
        if sm is None:
            sm = self._served[model.key] = kc.ServedModel(model)
        return sm

    def counters(self, sm: kc.ServedModel) -> Counters:
        c = self._counters.get(sm.model.key)
        if c is None:
            c = self._counters[sm.model.key] = Counters()
        return c

    # -- health and metadata -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every model loaded and not draining: what the health service's SERVING means too."""
        return self.engine.loaded and not self.engine.closing

    @unary("ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    @unary("ModelReady")
    async def ModelReady(self, request, context):
        try:
            self.model(request.name, request.version)
        except ServeError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.ready)

    @unary("ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="seqserve", version=seqserve.__version__, extensions=EXTENSIONS)

    @unary("ModelMetadata")
    async def ModelMetadata(self, request, context):
        sm = self.model(request.name, request.version)
        return kc.model_metadata(sm, sorted(self.engine.registry.models[sm.name]))

    @unary("ModelConfig")
    async def ModelConfig(self, request, context):
        sm = self.model(request.name, request.version)
        cfg = self.engine.config
        max_batch = placement_for(sm.model.runtime, cfg).max_batch if cfg.batching == "on" else 1
        return kc.model_config(sm, max_batch, cfg.idle_ttl_s)

    @unary("ModelStatistics")
    async def ModelStatistics(self, request, context):
        if request.name:
            models = [self.model(request.name, request.version)]
        else:
            models = [self.served(m) for m in self.engine.registry.all()]
        return pb.ModelStatisticsResponse(model_stats=[self._statistics(sm) for sm in models])

    def _statistics(self, sm: kc.ServedModel) -> pb.ModelStatistics:
        c = self._counters.get(sm.model.key) or Counters()
        stats = getattr(self.engine.scheduler(sm.model), "stats", None)
        return pb.ModelStatistics(
            name=sm.name,
            version=sm.version_str,
            last_inference=c.last_ms,
            inference_count=c.inferences,
            execution_count=stats.runs if stats is not None else 0,  # model runs, over both APIs
            inference_stats=pb.InferStatistics(
                success=pb.StatisticDuration(count=c.success, ns=c.success_ns),
                fail=pb.StatisticDuration(count=c.fail, ns=c.fail_ns),
            ),
        )

    @unary("RepositoryIndex")
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=str(m.version), state="READY")
                for m in self.engine.registry.all()
            ]
        )

    # -- inference ---------------------------------------------------------------------------------
    @unary("ModelInfer")
    async def ModelInfer(self, request, context):
        started = time.perf_counter_ns()
        sm = self.model(request.model_name, request.model_version)
        try:
            sequence_id, start, end = kc.sequence_control(request.parameters, sm.name)
            step, names = kc.step_request(request, sm, "")  # checked whole before the sequence moves
            seq = self.sequences.begin(sm.name, sm.version, sequence_id, start, end)
            step.session_id = seq.session_id
            try:
                out = await self.engine.step(step)
            except ServeError as err:
                raise self.sequences.refusal(seq, err) from None
            finally:
                self.sequences.done(seq)
        except ServeError:
            self.counters(sm).count(started, 0, False)
            raise
        self.counters(sm).count(started, out.steps, True)
        return kc.infer_response(sm, request.id, names, out)

    async def ModelStreamInfer(self, request_iterator, context):
        await run_stream(self, context, InferStream(self), self._read)

    async def _read(self, context, stream: InferStream) -> None:
        limit = self.engine.config.max_inflight_per_stream
        read, eof = context.read, grpc.aio.EOF
        try:
            while True:
                request = await read()
                if request is eof:
                    return
                stream.received += 1
                stream.holding = True
                try:
                    self._submit(stream, request)
                finally:
                    stream.holding = False
                if stream.out:
                    stream.wake()
                if stream.received - stream.sent >= limit:  # stop reading until the client reads its answers
                    stream.space = asyncio.get_running_loop().create_future()
                    stream.wake()
                    await stream.space
        finally:
            stream.input_done = True
            stream.wake()

    def _submit(self, stream: InferStream, request: pb.ModelInferRequest) -> None:
        req = InFlight(request)
        try:
            sm = req.model = self.model(request.model_name, request.model_version)
            sequence_id, start, end = kc.sequence_control(request.parameters, sm.name)
            tag = stream.next_tag
            step, req.names = kc.step_request(request, sm, "", tag)
            seq = req.seq = self.sequences.begin(sm.name, sm.version, sequence_id, start, end)
        except ServeError as err:
            stream.finish(req, None, err)
            return
        stream.next_tag = tag + 1
        step.session_id = seq.session_id
        stream.pending[tag] = req
        self.engine.submit_stream_step(step, stream)

    def close_streams(self) -> None:
        """Shutdown: each stream ends once its accepted requests are answered."""
        self.closing = True
        for stream in list(self.streams):
            stream.wake()


def add_to_server(engine: Engine, server: grpc.aio.Server, calls: CallCounts) -> KServeServicer:
    """Serve the KServe API for ``engine`` on ``server``, next to the native one."""
    servicer = KServeServicer(engine, calls)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
