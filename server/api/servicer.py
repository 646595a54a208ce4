"""The gRPC face of the engine: convert messages and statuses, nothing else.

StepStream reads steps in one coroutine (each is validated and queued without waiting for the
previous one, so sessions sharing a stream run concurrently) and writes results in another, as
the scheduler completes them. When a step's result is ready as soon as it is queued (a session
stepping alone runs at once) and the writer is idle, the reader writes it itself: one task hop
less on the single-session latency path. ``sink.writing`` keeps the two from writing at once. A
refused step becomes a StepResult with ``error``; the stream goes on.

PackedStepStream is the same pair of coroutines over PackedSteps/PackedResults: a message's steps,
StepRequests and column blocks alike, are queued together (engine.submit_stream_steps) so they share runs, and the writer sends what has
completed since its last write as one message (outbox.PackedOutbox), column by column when the
client asked for that. When the server shuts down, each stream is ended with UNAVAILABLE once its
last accepted step has been answered.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from ..engine import Engine
from . import convert
from .calls import CallCounts, server_stream, unary
from .outbox import PackedOutbox, StreamOutbox

PACKED_MARK = ("seqserve-stream", "packed")  # the first metadata of a PackedStepStream (the SDK waits for it)


class SeqServeServicer(pb_grpc.SeqServeServicer):
    """Implements seqserve.v1.SeqServe on an Engine."""

    def __init__(self, engine: Engine, calls: CallCounts):
        self.engine = engine
        self.calls = calls
        self.streams: set[StreamOutbox] = set()
        self.closing = False

    @unary("ListModels")
    async def ListModels(self, request, context):
        return convert.model_list(self.engine.list_models())

    @unary("CreateSession")
    async def CreateSession(self, request, context):
        return convert.session_info(self.engine.create_session(request.model, request.version, request.session_id))

    @unary("GetSession")
    async def GetSession(self, request, context):
        return convert.session_info(self.engine.get_session(request.session_id))

    @unary("CloseSession")
    async def CloseSession(self, request, context):
        return pb.CloseSessionResponse(position=self.engine.close_session(request.session_id))

    @unary("ResetSession")
    async def ResetSession(self, request, context):
        return convert.session_info(self.engine.reset_session(request.session_id))

    @unary("Step")
    async def Step(self, request, context):
        return convert.step_result(await self.engine.step(convert.step_request(request)))

    async def StepStream(self, request_iterator, context):
        await run_stream(self, context, StreamOutbox(self.calls, "StepStream"), self._read)

    async def PackedStepStream(self, request_iterator, context):
        # Said first, so a client knows this server packs before it writes (client/aio_stream.py).
        await context.send_initial_metadata((PACKED_MARK,))
        await run_stream(self, context, PackedOutbox(self.calls, "PackedStepStream"), self._read_packed)

    async def _read(self, context, sink: StreamOutbox) -> None:
        # the one-step-per-message path, kept inline: _after_submit's work, without a coroutine per step
        submit, to_step = self.engine.submit_stream_step, convert.step_request
        limit = self.engine.config.max_inflight_per_stream
        read, write, out, eof = context.read, context.write, sink.out, grpc.aio.EOF
        try:
            while True:
                request = await read()
                if request is eof:
                    return
                sink.received += 1
                sink.holding = True
                try:
                    submit(to_step(request), sink)
                finally:
                    sink.holding = False
                if out:
                    if sink.waiter is not None and not sink.writing:  # the writer is idle: write here
                        sink.writing = True
                        try:
                            while out:
                                result = out.popleft()
                                sink.sent += 1
                                await write(result)
                        finally:
                            sink.writing = False
                    if out:  # results that came meanwhile, or a writer busy: they are the writer's
                        sink.wake()
                if sink.received - sink.sent >= limit:  # stop reading until the client reads its results
                    sink.space = asyncio.get_running_loop().create_future()
                    sink.wake()
                    await sink.space
        finally:
            sink.input_done = True
            sink.wake()

    async def _read_packed(self, context, sink: PackedOutbox) -> None:
        engine, to_step = self.engine, convert.step_request
        read, eof = context.read, grpc.aio.EOF
        try:
            while True:
                request = await read()
                if request is eof:
                    return
                if request.columns:  # the client reads ResultColumns
                    sink.columns = True
                steps, columns = request.steps, request.step_columns
                blocks = [convert.step_block(b) for b in columns] if columns else []
                n = len(steps) + sum(len(b.session_ids) for b in blocks)
                if not n:
                    continue
                sink.received += n
                sink.holding = True
                try:
                    if n == 1 and not blocks:  # alone, it may run at once (the single-session latency path)
                        engine.submit_stream_step(to_step(steps[0]), sink)
                    else:
                        engine.submit_stream_steps(map(to_step, steps), sink, blocks)
                finally:
                    sink.holding = False
                await self._after_submit(context, sink)
        finally:
            sink.input_done = True
            sink.wake()

    async def _after_submit(self, context, sink: StreamOutbox) -> None:
        """After queueing a request: write answers that are ready already when the writer is idle
        (one task hop less), and stop reading while too many steps wait for their answers."""
        out = sink.out
        if out:
            if sink.waiter is not None and not sink.writing:  # the writer is idle: write here
                write, size = context.write, sink.size
                sink.writing = True
                try:
                    while out:
                        result = out.popleft()
                        sink.sent += size(result)
                        await write(result)
                finally:
                    sink.writing = False
            if out:  # results that came meanwhile, or a writer busy: they are the writer's
                sink.wake()
        if sink.received - sink.sent >= self.engine.config.max_inflight_per_stream:
            # stop reading until the client reads its results
            sink.space = asyncio.get_running_loop().create_future()
            sink.wake()
            await sink.space

    @server_stream("Generate")
    async def Generate(self, request, context):
        async with contextlib.aclosing(self.engine.generate(convert.generate_request(request))) as chunks:
            async for chunk in chunks:
                yield convert.generate_response(chunk)

    def close_streams(self) -> None:
        """Shutdown: each stream ends once its accepted steps are answered."""
        self.closing = True
        for sink in list(self.streams):
            sink.wake()


async def run_stream(owner, context, sink: StreamOutbox, read) -> None:
    """A bidirectional stream's writer, shared by StepStream, PackedStepStream and KServe's
    ModelStreamInfer: ``read`` (the stream's reader coroutine) feeds the engine in its own task, and
    this writes the answers its outbox gathers. ``owner`` is the servicer: its ``streams`` (to end
    them at shutdown), ``calls`` (open streams, for metrics) and ``closing``."""
    rpc = sink.rpc
    owner.streams.add(sink)
    owner.calls.open_streams[rpc] += 1
    loop = asyncio.get_running_loop()
    reader = loop.create_task(read(context, sink))
    out, write, size = sink.out, context.write, sink.size
    try:
        while True:
            while out and not sink.writing:
                result = out.popleft()
                sink.sent += size(result)
                sink.writing = True
                try:
                    await write(result)
                finally:
                    sink.writing = False
            space = sink.space
            if space is not None:
                sink.space = None
                space.set_result(None)
            if sink.received == sink.sent:
                if sink.input_done:
                    return
                if owner.closing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            sink.waiter = loop.create_future()
            await sink.waiter
    finally:
        owner.streams.discard(sink)
        owner.calls.open_streams[rpc] -= 1
        reader.cancel()
