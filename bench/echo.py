"""The transport ceiling: a minimal grpc.aio SeqServe that answers without running a model.

``python -m seqserve.bench.echo --port 0`` prints ``listening on HOST:PORT``. StepStream answers
every StepRequest at once with a StepResult of the size the real server sends for that request
(session id, tag, position, width, and ``top_k`` ids and log-probs for the last position), so the load
generator pays the same serialisation and transport costs as against the server, and nothing else.
CreateSession/CloseSession only hand out and forget ids.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

_DEFAULT_TOP_K = 5  # what the server returns for an empty OutputSpec
# Reply ids: mostly below 128 (one byte each on the wire), one above (two bytes), like a byte LM's top-k.
_IDS = (32, 101, 116, 97, 195)


class EchoServicer(pb_grpc.SeqServeServicer):
    """Answers steps with fixed values; keeps only each session's position."""

    def __init__(self, width: int) -> None:
        self._width = width
        self._positions: dict[str, int] = {}

    async def CreateSession(self, request, context):
        sid = request.session_id or secrets.token_urlsafe(16)  # the same length as the server's ids
        self._positions[sid] = 0
        return pb.SessionInfo(session_id=sid, model=request.model, version=1)

    async def CloseSession(self, request, context):
        return pb.CloseSessionResponse(position=self._positions.pop(request.session_id, 0))

    def _answer(self, req: pb.StepRequest) -> pb.StepResult:
        position = self._positions.get(req.session_id, 0) + len(req.tokens)
        self._positions[req.session_id] = position
        out = req.output
        k = 0 if out.none else (out.top_k or (_DEFAULT_TOP_K if not (out.logits or out.argmax or out.probs) else 0))
        if not k:
            return pb.StepResult(session_id=req.session_id, tag=req.tag, position=position)
        ids = [_IDS[i % len(_IDS)] for i in range(k)]
        return pb.StepResult(session_id=req.session_id, tag=req.tag, position=position, steps=1,
                             width=self._width, top_k_ids=ids, top_k_logprobs=[-1.5] * k)

    async def Step(self, request, context):
        return self._answer(request)

    async def StepStream(self, request_iterator, context):
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            await context.write(self._answer(req))


async def serve(host: str, port: int, width: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SeqServeServicer_to_server(EchoServicer(width), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC echo with StepResult-sized replies (transport ceiling)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--width", type=int, default=256, help="the model's logits per step (StepResult.width)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.width))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
