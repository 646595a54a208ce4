"""Load-generating client process: drives a server (or the echo) over the raw generated stubs.

Run as ``python -m seqserve.bench.loadgen --target HOST:PORT``. It reads one JSON command per line
on stdin and answers each with one JSON line on stdout, so the harness can keep a few of these
processes alive, prepare sessions in all of them, then start the measured traffic in all of them at
the same wall-clock moment:

  {"cmd": "prepare", "kind": "stream"|"kserve"|"sdk"|"generate", "model": M, "sessions": N, ...}  -> {"ok": true}
  {"cmd": "go", "start": UNIX_TIME, "warmup": S, "duration": S}                     -> results
  {"cmd": "create", "model": M, "count": N}      (memory measurement: idle sessions, kept open)
  {"cmd": "touch"}                               (one step for every session made by "create")
  {"cmd": "quit"}

Streaming sessions are closed loops (send a step, await its result, send the next) multiplexed over
a few StepStream calls by ``tag``; with ``"long_prompt": N`` one more session feeds N-token prompts
meanwhile, untallied (head-of-line blocking shows in the others' latency); generating sessions call Generate again whenever a call ends.
"kserve" runs the same closed loops as Triton sequences over ModelStreamInfer (KServe v2 API), told
apart by request ``id``, as perf_analyzer drives a stateful model: raw stubs, raw tensor contents.
"sdk" runs the same closed loops through the Python SDK instead: every session of the process on
one ``AsyncClient.stream()`` (a gateway carrying many users' sessions), packed (``"packed": true``,
the SDK's default: the steps waiting to be sent leave as one PackedStepStream message) or one step
per StepStream message.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from seqserve.kserve import grpc_service_pb2 as kp
from seqserve.kserve import grpc_service_pb2_grpc as kg
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

_DRAIN_TIMEOUT_S = 60.0  # how long to wait for in-flight results after the window closes


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

    def error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text


def _token(i: int, n: int, vocab: int) -> int:
    return (i * 31 + n * 7 + 1) % vocab


async def _drive_stream(stub, session_ids, job, window: Window, tally: Tally) -> None:
    """Closed loops for ``session_ids`` over one StepStream call."""
    spec = pb.OutputSpec(top_k=job["top_k"]) if job["top_k"] else pb.OutputSpec(none=True)
    per_msg, vocab = job["tokens"], job["vocab"]
    call = stub.StepStream()
    sent = [0.0] * len(session_ids)
    steps = [0] * len(session_ids)

    def request(i: int) -> pb.StepRequest:
        steps[i] += 1
        toks = [_token(i, steps[i] + j, vocab) for j in range(per_msg)]
        return pb.StepRequest(session_id=session_ids[i], tokens=toks, output=spec, tag=i)

    for i in range(len(session_ids)):
        sent[i] = time.perf_counter()
        await call.write(request(i))
    outstanding = len(session_ids)
    while outstanding:
        res = await call.read()
        now = time.perf_counter()
        if res is grpc.aio.EOF:
            tally.error(f"stream ended early: {await call.code()} {await call.details()}")
            return
        i = res.tag
        if res.error.code:
            tally.error(f"step failed: {res.error.message}")
        elif window.holds(now):
            tally.results += 1
            tally.tokens += per_msg
            tally.latencies_ms.append((now - sent[i]) * 1e3)
            if len(tally.reply_bytes) < 16:
                tally.reply_bytes.append(res.ByteSize())
        if now < window.close_at and not res.error.code:
            sent[i] = time.perf_counter()
            await call.write(request(i))
        else:
            outstanding -= 1
    await call.done_writing()
    code = await call.code()
    if code != grpc.StatusCode.OK:
        tally.error(f"stream ended with {code.name}: {await call.details()}")


def _kserve_request(model: str, sequence_id: int, start: bool = False, end: bool = False) -> kp.ModelInferRequest:
    """A one-token step of one sequence; the caller sets the token's bytes in raw_input_contents[0]."""
    req = kp.ModelInferRequest(model_name=model)
    req.parameters["sequence_id"].int64_param = sequence_id
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    req.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    req.raw_input_contents.append(b"")
    return req


_TOKEN_BYTES: dict[int, bytes] = {}


def _token_bytes(token: int) -> bytes:
    raw = _TOKEN_BYTES.get(token)
    if raw is None:
        raw = _TOKEN_BYTES[token] = token.to_bytes(8, "little", signed=True)
    return raw


async def _drive_kserve_stream(stub, sequence_ids, job, window: Window, tally: Tally) -> None:
    """Closed loops for ``sequence_ids`` over one ModelStreamInfer call."""
    vocab = job["vocab"]
    call = stub.ModelStreamInfer()
    sent = [0.0] * len(sequence_ids)
    steps = [0] * len(sequence_ids)
    # one message per sequence, made once: a step only changes its token (and id); the previous
    # write of it was serialized before its answer came back
    requests = [_kserve_request(job["model"], sid) for sid in sequence_ids]
    for i, req in enumerate(requests):
        req.id = str(i)

    def request(i: int) -> kp.ModelInferRequest:
        steps[i] += 1
        req = requests[i]
        req.raw_input_contents[0] = _token_bytes(_token(i, steps[i], vocab))
        return req

    for i in range(len(sequence_ids)):
        sent[i] = time.perf_counter()
        await call.write(request(i))
    outstanding = len(sequence_ids)
    while outstanding:
        res = await call.read()
        now = time.perf_counter()
        if res is grpc.aio.EOF:
            tally.error(f"stream ended early: {await call.code()} {await call.details()}")
            return
        i = int(res.infer_response.id)
        if res.error_message:
            tally.error(f"step failed: {res.error_message}")
        elif window.holds(now):
            tally.results += 1
            tally.tokens += 1
            tally.latencies_ms.append((now - sent[i]) * 1e3)
            if len(tally.reply_bytes) < 16:
                tally.reply_bytes.append(res.ByteSize())
        if now < window.close_at and not res.error_message:
            sent[i] = time.perf_counter()
            await call.write(request(i))
        else:
            outstanding -= 1
    await call.done_writing()
    code = await call.code()
    if code != grpc.StatusCode.OK:
        tally.error(f"stream ended with {code.name}: {await call.details()}")


async def _drive_generate(stub, session_id, job, window: Window, tally: Tally) -> None:
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


async def _drive_sdk(client, sessions, job, window: Window, tally: Tally) -> None:
    """Closed loops for ``sessions`` (SDK sessions), all through one SDK stream."""
    from seqserve.client import Output, SeqServeError

    output = Output(top_k=job["top_k"]) if job["top_k"] else Output(none=True)
    vocab, per_msg = job["vocab"], job["tokens"]
    stream = client.stream(window=len(sessions), packed=job["packed"])

    async def one(i: int, session) -> None:
        n = 0
        while True:
            n += 1
            tokens = [_token(i, n + j, vocab) for j in range(per_msg)]
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


async def _drive_long_prompts(stub, session_id: str, job, window: Window) -> None:
    """Background load, not tallied: one session feeding ``long_prompt`` tokens over and over (in
    steps of at most 4096, the server's default limit), asking for nothing but the position."""
    total, vocab = job["long_prompt"], job["vocab"]
    per_step = min(total, 4096)
    spec = pb.OutputSpec(none=True)
    n = 0
    while time.perf_counter() < window.close_at:
        fed = 0
        while fed < total:
            size = min(per_step, total - fed)
            tokens = [_token(7, n + j, vocab) for j in range(size)]
            n += size
            await stub.Step(pb.StepRequest(session_id=session_id, tokens=tokens, output=spec))
            fed += size


class Worker:
    """Holds the channel and the sessions between commands."""

    def __init__(self, target: str):
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.SeqServeStub(self.channel)
        self.kstub = kg.GRPCInferenceServiceStub(self.channel)
        self._sequence_ids = itertools.count((os.getpid() << 24) + 1)  # unique across the load generators
        self.job: dict | None = None
        self.sessions: list[str] = []
        self.idle: list[str] = []
        self.sequences: list[int] = []  # KServe sequence ids of a "kserve" job
        self.target = target
        self.client: Any = None  # the SDK's AsyncClient, made for the first "sdk" job
        self.sdk_sessions: list = []  # its sessions in an "sdk" job
        self.long_prompt = ""  # the session feeding long prompts next to a "stream" job's, if any

    async def _create(self, model: str, count: int, concurrency: int) -> list[str]:
        made: list[str] = []

        async def one_lane(n: int) -> None:
            for _ in range(n):
                info = await self.stub.CreateSession(pb.CreateSessionRequest(model=model))
                made.append(info.session_id)

        lanes = min(concurrency, count) or 1
        await asyncio.gather(*(one_lane(count // lanes + (1 if i < count % lanes else 0)) for i in range(lanes)))
        return made

    async def _close(self, ids: list[str]) -> None:
        async def one_lane(chunk: list[str]) -> None:
            for sid in chunk:
                await self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid))

        await asyncio.gather(*(one_lane(ids[i::32]) for i in range(min(32, len(ids)))))

    async def prepare(self, cmd: dict) -> dict:
        t0 = time.perf_counter()
        self.job = cmd
        if cmd["kind"] == "kserve":  # sequences are started by their first step, outside the measurement
            self.sequences = [next(self._sequence_ids) for _ in range(cmd["sessions"])]
            await self._kserve_steps(cmd["model"], start=True)
            return {"ok": True, "prepare_s": time.perf_counter() - t0}
        if cmd["kind"] == "sdk":
            from seqserve.client import AsyncClient

            self.client = self.client or AsyncClient(self.target, timeout=60)
            self.sdk_sessions = [await self.client.session(cmd["model"]) for _ in range(cmd["sessions"])]
            return {"ok": True, "prepare_s": time.perf_counter() - t0}
        self.sessions = await self._create(cmd["model"], cmd["sessions"], 32) if cmd["sessions"] else []
        self.long_prompt = (await self._create(cmd["model"], 1, 1))[0] if cmd.get("long_prompt") else ""
        if cmd["kind"] == "generate":  # generation needs a first token; feed it outside the measurement
            await asyncio.gather(
                *(
                    self.stub.Step(
                        pb.StepRequest(
                            session_id=sid, tokens=[_token(i, 0, cmd["vocab"])], output=pb.OutputSpec(none=True)
                        )
                    )
                    for i, sid in enumerate(self.sessions)
                )
            )
        return {"ok": True, "prepare_s": time.perf_counter() - t0}

    async def _kserve_steps(self, model: str, start: bool = False, end: bool = False) -> None:
        """One step of every sequence in ``self.sequences`` (a start or an end), over one stream."""
        requests = []
        for i, sid in enumerate(self.sequences):
            req = _kserve_request(model, sid, start, end)
            req.raw_input_contents[0] = _token_bytes(1)
            req.id = str(i)
            requests.append(req)
        async for res in self.kstub.ModelStreamInfer(iter(requests)):
            if res.error_message:
                raise RuntimeError(f"KServe sequence step failed: {res.error_message}")

    async def go(self, cmd: dict) -> dict:
        job, tally = self.job, Tally()
        assert job is not None, "go before prepare"
        wall_to_perf = time.perf_counter() - time.time()
        window = Window(
            cmd["start"] + cmd["warmup"] + wall_to_perf, cmd["start"] + cmd["warmup"] + cmd["duration"] + wall_to_perf
        )
        await asyncio.sleep(max(0.0, cmd["start"] - time.time()))
        cpu0 = time.process_time()
        if job["kind"] == "kserve":
            streams = max(1, min(job["streams"], len(self.sequences)))
            kgroups = [self.sequences[i::streams] for i in range(streams)]
            tasks = [_drive_kserve_stream(self.kstub, g, job, window, tally) for g in kgroups if g]
        elif job["kind"] == "sdk":
            tasks = [_drive_sdk(self.client, self.sdk_sessions, job, window, tally)] if self.sdk_sessions else []
        elif job["kind"] == "stream":
            streams = max(1, min(job["streams"], len(self.sessions)))
            groups = [self.sessions[i::streams] for i in range(streams)]
            tasks = [_drive_stream(self.stub, g, job, window, tally) for g in groups if g]
            if self.long_prompt:
                tasks.append(_drive_long_prompts(self.stub, self.long_prompt, job, window))
        else:
            tasks = [_drive_generate(self.stub, sid, job, window, tally) for sid in self.sessions]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), cmd["warmup"] + cmd["duration"] + _DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"{job['kind']} traffic did not finish {_DRAIN_TIMEOUT_S:g} s after the window "
                "closed: the server stopped answering"
            ) from None
        cpu = time.process_time() - cpu0
        if job["kind"] == "kserve":
            await self._kserve_steps(job["model"], end=True)
        elif job["kind"] == "sdk":
            await asyncio.gather(*(s.close() for s in self.sdk_sessions))
            self.sdk_sessions = []
        else:
            await self._close(self.sessions + ([self.long_prompt] if self.long_prompt else []))
        self.sessions, self.sequences, self.job, self.long_prompt = [], [], None, ""
        return {
            "ok": True,
            "results": tally.results,
            "tokens": tally.tokens,
            "errors": tally.errors,
            "first_error": tally.first_error,
            "client_cpu_s": cpu,
            "reply_bytes": sum(tally.reply_bytes) / len(tally.reply_bytes) if tally.reply_bytes else 0,
            "latencies_ms": [round(x, 4) for x in tally.latencies_ms],
        }

    async def create_idle(self, cmd: dict) -> dict:
        t0 = time.perf_counter()
        self.idle += await self._create(cmd["model"], cmd["count"], cmd.get("concurrency", 64))
        return {"ok": True, "created": len(self.idle), "seconds": time.perf_counter() - t0}

    async def touch(self, cmd: dict) -> dict:
        """One 1-token step for every idle session, pipelined over a few streams."""
        t0 = time.perf_counter()
        tally = Tally()

        async def one_stream(ids: list[str]) -> None:
            call = self.stub.StepStream()
            room = asyncio.Semaphore(128)

            async def writer() -> None:
                for i, sid in enumerate(ids):
                    await room.acquire()
                    await call.write(pb.StepRequest(session_id=sid, tokens=[1], output=pb.OutputSpec(none=True), tag=i))
                await call.done_writing()

            async def reader() -> None:
                for _ in ids:
                    res = await call.read()
                    if res is grpc.aio.EOF:
                        tally.error("stream ended early")
                        return
                    if res.error.code:
                        tally.error(res.error.message)
                    room.release()

            await asyncio.gather(writer(), reader())
            await call.code()

        streams = cmd.get("streams", 4)
        await asyncio.gather(*(one_stream(self.idle[i::streams]) for i in range(streams) if self.idle[i::streams]))
        return {
            "ok": True,
            "errors": tally.errors,
            "first_error": tally.first_error,
            "seconds": time.perf_counter() - t0,
        }


async def _serve_commands(target: str) -> None:
    worker = Worker(target)
    handlers = {"prepare": worker.prepare, "go": worker.go, "create": worker.create_idle, "touch": worker.touch}
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            answer = await handlers[cmd["cmd"]](cmd)
        except grpc.aio.AioRpcError as exc:
            answer = {"ok": False, "error": f"{exc.code().name}: {exc.details()}"}
        except Exception as exc:  # reported to the harness, which stops the run with this message
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    await worker.channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the server or echo")
    args = parser.parse_args(argv)
    asyncio.run(_serve_commands(args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
