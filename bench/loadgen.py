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
meanwhile, tallied apart as ``side_tokens`` (head-of-line blocking shows in the others' latency); generating sessions call Generate again whenever a call ends.
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
from typing import Any

import grpc

from seqserve.kserve import grpc_service_pb2_grpc as kg
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .drivers import (
    Tally,
    Window,
    drive_generate,
    drive_kserve_stream,
    drive_long_prompts,
    drive_sdk,
    drive_stream,
    kserve_request,
    token,
    token_bytes,
)

_DRAIN_TIMEOUT_S = 60.0  # how long to wait for in-flight results after the window closes


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
                            session_id=sid, tokens=[token(i, 0, cmd["vocab"])], output=pb.OutputSpec(none=True)
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
            req = kserve_request(model, sid, start, end)
            req.raw_input_contents[0] = token_bytes(1)
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
            tasks = [drive_kserve_stream(self.kstub, g, job, window, tally) for g in kgroups if g]
        elif job["kind"] == "sdk":
            tasks = [drive_sdk(self.client, self.sdk_sessions, job, window, tally)] if self.sdk_sessions else []
        elif job["kind"] == "stream":
            streams = max(1, min(job["streams"], len(self.sessions)))
            groups = [self.sessions[i::streams] for i in range(streams)]
            tasks = [drive_stream(self.stub, g, job, window, tally) for g in groups if g]
            if self.long_prompt:
                tasks.append(drive_long_prompts(self.stub, self.long_prompt, job, window, tally))
        else:
            tasks = [drive_generate(self.stub, sid, job, window, tally) for sid in self.sessions]
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
            "side_tokens": tally.side_tokens,
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
