"""The gRPC face of the engine: convert messages and statuses, nothing else.

StepStream reads steps in one coroutine (each is validated and queued without waiting for the
previous one, so sessions sharing a stream run concurrently) and writes results in another, as
the scheduler completes them. When a step's result is ready as soon as it is queued (a session
stepping alone runs at once) and the writer is idle, the reader writes it itself: one task hop
less on the single-session latency path. ``sink.writing`` keeps the two from writing at once. A refused step becomes a StepResult with ``error``; the stream
goes on. When the server shuts down, each stream is ended with UNAVAILABLE once its last
accepted step has been answered.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from ..engine import Engine
from ..errors import ServeError
from . import convert
from .outbox import StreamOutbox
from .status import abort


class SeqServeServicer(pb_grpc.SeqServeServicer):
    """Implements seqserve.v1.SeqServe on an Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.streams: set[StreamOutbox] = set()
        self.closing = False

    async def ListModels(self, request, context):
        return convert.model_list(self.engine.list_models())

    async def CreateSession(self, request, context):
        try:
            return convert.session_info(self.engine.create_session(request.model, request.version, request.session_id))
        except ServeError as err:
            await abort(context, err)

    async def GetSession(self, request, context):
        try:
            return convert.session_info(self.engine.get_session(request.session_id))
        except ServeError as err:
            await abort(context, err)

    async def CloseSession(self, request, context):
        try:
            return pb.CloseSessionResponse(position=self.engine.close_session(request.session_id))
        except ServeError as err:
            await abort(context, err)

    async def ResetSession(self, request, context):
        try:
            return convert.session_info(self.engine.reset_session(request.session_id))
        except ServeError as err:
            await abort(context, err)

    async def Step(self, request, context):
        try:
            return convert.step_result(await self.engine.step(convert.step_request(request)))
        except ServeError as err:
            await abort(context, err)

    async def StepStream(self, request_iterator, context):
        sink = StreamOutbox()
        self.streams.add(sink)
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(context, sink))
        out, write = sink.out, context.write
        try:
            while True:
                while out and not sink.writing:
                    result = out.popleft()
                    sink.sent += 1
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
                    if self.closing:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                sink.waiter = loop.create_future()
                await sink.waiter
        finally:
            self.streams.discard(sink)
            reader.cancel()

    async def _read(self, context, sink: StreamOutbox) -> None:
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

    async def Generate(self, request, context):
        try:
            async with contextlib.aclosing(self.engine.generate(convert.generate_request(request))) as chunks:
                async for chunk in chunks:
                    yield convert.generate_response(chunk)
        except ServeError as err:
            await abort(context, err)

    def close_streams(self) -> None:
        """Shutdown: each stream ends once its accepted steps are answered."""
        self.closing = True
        for sink in list(self.streams):
            sink.wake()
