"""The workloads a load-generating process runs (loadgen.py), each a coroutine driving one kind of
traffic through the window: streaming closed loops over StepStream, the same over KServe's
ModelStreamInfer, Generate calls back to back, closed loops through the SDK's stream, and the
untallied long prompts beside streaming sessions. They count what falls inside the window in a
Tally.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from seqserve.kserve import grpc_service_pb2 as kp
from seqserve.v1 import seqserve_pb2 as pb


@dataclass
class Window:
    """The measured interval, in this process's perf_counter clock."""

    open_at: float
    close_at: float

    def holds(self, t: float) -> bool:
        return self.open_at <= t < self.close_at


@dataclass
class Tally:
    """What one process saw inside the window."""

    results: int = 0
    tokens: int = 0
    errors: int = 0
    first_error: str = ""
    reply_bytes: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    side_tokens: int = 0  # fed by the side load (a long-prompt session) inside the window, not in ``tokens``

    def error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text


def token(i: int, n: int, vocab: int) -> int:
    return (i * 31 + n * 7 + 1) % vocab


async def _closed_loops(call, count: int, request, answer, tokens: int, window: Window, tally: Tally) -> None:
    """``count`` closed loops over one bidirectional stream ``call``: ``request(i)`` is loop i's
    next message, ``answer(reply)`` the loop a reply belongs to and its error ("" for none); each
    loop sends again on its reply until the window closes, then the stream is half-closed. A reply
    inside the window counts ``tokens`` tokens and its latency."""
    sent = [0.0] * count
    for i in range(count):
        sent[i] = time.perf_counter()
        await call.write(request(i))
    outstanding = count
    while outstanding:
        res = await call.read()
        now = time.perf_counter()
        if res is grpc.aio.EOF:
            tally.error(f"stream ended early: {await call.code()} {await call.details()}")
            return
        i, error = answer(res)
        if error:
            tally.error(f"step failed: {error}")
        elif window.holds(now):
            tally.results += 1
            tally.tokens += tokens
            tally.latencies_ms.append((now - sent[i]) * 1e3)
            if len(tally.reply_bytes) < 16:
                tally.reply_bytes.append(res.ByteSize())
        if now < window.close_at and not error:
            sent[i] = time.perf_counter()
            await call.write(request(i))
        else:
            outstanding -= 1
    await call.done_writing()
    code = await call.code()
    if code != grpc.StatusCode.OK:
        tally.error(f"stream ended with {code.name}: {await call.details()}")


async def drive_stream(stub, session_ids, job, window: Window, tally: Tally) -> None:
    """Closed loops for ``session_ids`` over one StepStream call."""
    spec = pb.OutputSpec(top_k=job["top_k"]) if job["top_k"] else pb.OutputSpec(none=True)
    per_msg, vocab = job["tokens"], job["vocab"]
    call = stub.StepStream()
    steps = [0] * len(session_ids)

    def request(i: int) -> pb.StepRequest:
        steps[i] += 1
        toks = [token(i, steps[i] + j, vocab) for j in range(per_msg)]
        return pb.StepRequest(session_id=session_ids[i], tokens=toks, output=spec, tag=i)

    def answer(res: pb.StepResult) -> tuple[int, str]:
        return res.tag, (res.error.message or f"code {res.error.code}") if res.error.code else ""

    await _closed_loops(call, len(session_ids), request, answer, per_msg, window, tally)


def kserve_request(model: str, sequence_id: int, start: bool = False, end: bool = False) -> kp.ModelInferRequest:
    """A one-token step of one sequence; the caller sets the token's bytes in raw_input_contents[0]."""
    req = kp.ModelInferRequest(model_name=model)
    req.parameters["sequence_id"].int64_param = sequence_id
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    req.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    req.raw_input_contents.append(b"")
    return req


_TOKEN_BYTES: dict[int, bytes] = {}


def token_bytes(token: int) -> bytes:
    raw = _TOKEN_BYTES.get(token)
    if raw is None:
        raw = _TOKEN_BYTES[token] = token.to_bytes(8, "little", signed=True)
    return raw


async def drive_kserve_stream(stub, sequence_ids, job, window: Window, tally: Tally) -> None:
    """Closed loops for ``sequence_ids`` over one ModelStreamInfer call."""
    vocab = job["vocab"]
    call = stub.ModelStreamInfer()
    steps = [0] * len(sequence_ids)
    # one message per sequence, made once: a step only changes its token (and id); the previous
    # write of it was serialized before its answer came back
    requests = [kserve_request(job["model"], sid) for sid in sequence_ids]
    for i, req in enumerate(requests):
        req.id = str(i)

    def request(i: int) -> kp.ModelInferRequest:
        steps[i] += 1
        req = requests[i]
        req.raw_input_contents[0] = token_bytes(token(i, steps[i], vocab))
        return req

    def answer(res: kp.ModelStreamInferResponse) -> tuple[int, str]:
        return int(res.infer_response.id), res.error_message

    await _closed_loops(call, len(sequence_ids), request, answer, 1, window, tally)


async def drive_generate(stub, session_id, job, window: Window, tally: Tally) -> None:
    """One session calling Generate (greedy) back to back until the window closes."""
    # prepare() fed each session one token, so every call continues from the session's last distribution
    req = pb.GenerateRequest(
        session_id=session_id,
        max_tokens=job["max_tokens"],
        sampling=pb.Sampling(temperature=0.0),
        tokens_per_message=job.get("tokens_per_message", 0),
    )
    while time.perf_counter() < window.close_at:
        call = stub.Generate(req)
        last = time.perf_counter()
        try:
            async for msg in call:
                now = time.perf_counter()
                n = len(msg.tokens)
                if n and window.holds(now):
                    tally.tokens += n
                    tally.results += 1
                    tally.latencies_ms.append((now - last) * 1e3 / n)
                last = now
                if now >= window.close_at:
                    call.cancel()
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                tally.error(f"Generate failed: {exc.code().name} {exc.details()}")
            return


async def drive_sdk(client, sessions, job, window: Window, tally: Tally) -> None:
    """Closed loops for ``sessions`` (SDK sessions), all through one SDK stream."""
    from seqserve.client import Output, SeqServeError

    output = Output(top_k=job["top_k"]) if job["top_k"] else Output(none=True)
    vocab, per_msg = job["vocab"], job["tokens"]
    stream = client.stream(window=len(sessions), packed=job["packed"])

    async def one(i: int, session) -> None:
        n = 0
        while True:
            n += 1
            tokens = [token(i, n + j, vocab) for j in range(per_msg)]
            sent = time.perf_counter()
            try:
                await stream.step(session, tokens, output)
            except SeqServeError as exc:
                tally.error(f"step failed: {exc}")
                return
            now = time.perf_counter()
            if window.holds(now):
                tally.results += 1
                tally.tokens += per_msg
                tally.latencies_ms.append((now - sent) * 1e3)
            if now >= window.close_at:
                return

    try:
        await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    finally:
        await stream.close()


async def drive_long_prompts(stub, session_id: str, job, window: Window, tally: Tally) -> None:
    """Background load: one session feeding ``long_prompt`` tokens over and over (in steps of at
    most 4096, the server's default limit), asking for nothing but the position. Its rate is
    counted as ``side_tokens``: each step's tokens in proportion to the part of its time inside the
    window (a step takes a sizeable part of the window)."""
    total, vocab = job["long_prompt"], job["vocab"]
    per_step = min(total, 4096)
    spec = pb.OutputSpec(none=True)
    n = 0
    while time.perf_counter() < window.close_at:
        fed = 0
        while fed < total:
            size = min(per_step, total - fed)
            tokens = [token(7, n + j, vocab) for j in range(size)]
            n += size
            sent = time.perf_counter()
            await stub.Step(pb.StepRequest(session_id=session_id, tokens=tokens, output=spec))
            done = time.perf_counter()
            inside = min(done, window.close_at) - max(sent, window.open_at)
            if inside > 0:
                tally.side_tokens += round(size * inside / (done - sent))
            fed += size
