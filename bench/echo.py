"""The transport ceiling: a minimal grpc.aio SeqServe that answers without running a model.

``python -m seqserve.bench.echo --port 0`` prints ``listening on HOST:PORT``. StepStream answers
every StepRequest at once with a StepResult of the size the real server sends for that request
(session id, tag, position, width, and ``top_k`` ids and log-probs for the last position), so the load
generator pays the same serialisation and transport costs as against the server, and nothing else.
CreateSession/CloseSession only hand out and forget ids.

With ``--bundle DIR`` it is the *inline floor* instead: before each reply it runs the model once for
that step, inline on the event loop: one ``InferenceSession.run`` of the model with the server's
top-k head (the ids and log-probs come out of the run), the session's state kept as dense arrays.
Nothing else of a server is there (no validation, no scheduling, no slots), so its single-session
latency is the least any server pays that runs the model on its event-loop thread; the bench sets
the server's latency beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys

import grpc
import numpy as np

from seqserve.server.runtime.graphs import HEAD_IDS, HEAD_K, HEAD_LOGPROBS, top_k_head_graph
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

    def _top_k(self, out: pb.OutputSpec) -> int:
        """How many top-k entries the server returns for ``out`` (0: none)."""
        if out.none or (not out.top_k and (out.logits or out.argmax or out.probs)):
            return 0
        return min(out.top_k or _DEFAULT_TOP_K, self._width)

    def _reply(self, req: pb.StepRequest, ids: list[int], logprobs: list[float]) -> pb.StepResult:
        """The session's position advanced by the step; a StepResult carrying ``ids`` if any."""
        position = self._positions.get(req.session_id, 0) + len(req.tokens)
        self._positions[req.session_id] = position
        if not ids:
            return pb.StepResult(session_id=req.session_id, tag=req.tag, position=position)
        return pb.StepResult(
            session_id=req.session_id,
            tag=req.tag,
            position=position,
            steps=1,
            width=self._width,
            top_k_ids=ids,
            top_k_logprobs=logprobs,
        )

    def _answer(self, req: pb.StepRequest) -> pb.StepResult:
        k = self._top_k(req.output)
        return self._reply(req, [_IDS[i % len(_IDS)] for i in range(k)], [-1.5] * k)

    async def Step(self, request, context):
        return self._answer(request)

    async def StepStream(self, request_iterator, context):
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            await context.write(self._answer(req))


class InlineModelServicer(EchoServicer):
    """The inline floor: each step runs the model once, then answers with its real top-k."""

    def __init__(self, bundle_dir: str, device: str, threads: int) -> None:
        from seqserve.bundle import load_bundle

        from .raw_ort import make_session

        bundle = load_bundle(bundle_dir)
        m = bundle.manifest
        if m.input_kind != "tokens":
            raise SystemExit(f"{bundle_dir}: the inline floor steps token models, this one takes {m.input_kind}")
        super().__init__(m.output_size)
        graph = top_k_head_graph(bundle.model_path, m.logits_name)
        if graph is None:
            raise SystemExit(f"{bundle_dir}: the model's opset is too old for the top-k head the floor runs")
        self._session = make_session(graph, threads, device)
        self._input = m.input_name
        self._state_names = [s.input for s in m.state]
        self._fetch = [s.output for s in m.state] + [HEAD_IDS, HEAD_LOGPROBS]
        self._zeros = [np.zeros(m.state_shape(1), np.float32) for _ in m.state]
        self._states: dict[str, list[np.ndarray]] = {}
        self._k_inputs: dict[int, np.ndarray] = {}  # k -> its int64 [1] input

    async def CloseSession(self, request, context):
        self._states.pop(request.session_id, None)
        return await super().CloseSession(request, context)

    def _answer(self, req: pb.StepRequest) -> pb.StepResult:
        sid, k = req.session_id, self._top_k(req.output)
        k_input = self._k_inputs.get(k)
        if k_input is None:
            k_input = self._k_inputs[k] = np.array([k], np.int64)
        feeds = dict(zip(self._state_names, self._states.get(sid, self._zeros)))
        feeds[self._input] = np.array(req.tokens, np.int64).reshape(1, -1)
        feeds[HEAD_K] = k_input
        *self._states[sid], ids, logprobs = self._session.run(self._fetch, feeds)
        return self._reply(req, ids[0].tolist(), logprobs[0].tolist())


async def serve(host: str, port: int, servicer: EchoServicer) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SeqServeServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC echo with StepResult-sized replies (transport ceiling)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--width", type=int, default=256, help="the model's logits per step (StepResult.width)")
    parser.add_argument(
        "--bundle",
        help="run this bundle's model inline for every step (the inline floor); the width is then the model's",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where --bundle's model runs")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads for --bundle's model")
    args = parser.parse_args(argv)
    servicer = (
        InlineModelServicer(args.bundle, args.device, args.intra_op_threads)
        if args.bundle
        else EchoServicer(args.width)
    )
    try:
        asyncio.run(serve(args.host, args.port, servicer))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
