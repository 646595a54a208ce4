"""Helpers for the engine-level tests: a started Engine on the tiny models, driven without gRPC.

Everything the engine does on the CPU with the default placement (step runs, generation lanes
below eight rows, the naive loop) happens on the event loop the test runs on. So between two
``await``s nothing else moves: a test that has just received a generation's first chunk knows the
generation is still running until it awaits again, without assuming anything about speed. Where a
test must wait for the engine (a cancel taking effect, a slot coming back), it waits for that
state with a generous bound (``wait_until``), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from seqserve.server.config import ServerConfig
from seqserve.server.domain import GenerateChunk, OutputSpec, StepAnswers, StepOutput, StepRequest
from seqserve.server.engine import Engine
from seqserve.server.errors import Reason, ServeError
from seqserve.server.work import GenSink, UnarySink

LOGITS = OutputSpec(logits=True)
PROMPT = [72, 101, 108, 108, 111, 32]  # "Hello "
TOL = 1e-4  # engine vs PyTorch (float32 vs float32 through different kernels)
ENDLESS = 1_000_000  # max_tokens of a generation that cannot end during a test (it is always cancelled)
MARGIN = 1e-4  # how far an overreaching model's extra logit lies above the one it shadows
LIAR_TOKEN = 280  # valid for the liar's manifest (vocabulary 300), past its 256-row embedding: the run fails


def copy_bundle(src_root: Path, name: str, dst_root: Path, new_name: str, version: int = 1, **manifest_changes) -> None:
    """Serve an existing bundle under another name (the ONNX file is untouched)."""
    dst = dst_root / new_name / str(version)
    shutil.copytree(src_root / name / "1", dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(name=new_name, version=version, **manifest_changes)
    (dst / "manifest.json").write_text(json.dumps(manifest))


def overreaching_bundle(src_root: Path, name: str, dst_root: Path, new_name: str, shadow: int) -> int:
    """``name``'s graph with one more logit column, ``MARGIN`` above column ``shadow``'s, under a
    manifest whose vocabulary counts it: where a greedy draw would pick ``shadow`` it picks the new
    id (the old width), which passes validation but lies past the embedding, so the run that feeds
    it fails (a generation's run failing midway, on the CPU provider). Returns the new id."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    copy_bundle(src_root, name, dst_root, new_name)
    folder = dst_root / new_name / "1"
    model = onnx.load(folder / "model.onnx")
    graph = model.graph
    out = graph.output[0]
    inner = out.name + "_before"
    for node in graph.node:  # the old output becomes an inner tensor
        node.output[:] = [inner if o == out.name else o for o in node.output]
    consts = {"starts": [shadow], "ends": [shadow + 1], "axes": [2]}
    graph.initializer.extend(helper.make_tensor(k, TensorProto.INT64, [1], v) for k, v in consts.items())
    graph.initializer.append(helper.make_tensor("margin", TensorProto.FLOAT, [], [MARGIN]))
    graph.node.extend(
        [
            helper.make_node("Slice", [inner, "starts", "ends", "axes"], ["shadowed"]),
            helper.make_node("Add", ["shadowed", "margin"], ["above"]),
            helper.make_node("Concat", [inner, "above"], [out.name], axis=2),
        ]
    )
    dim = out.type.tensor_type.shape.dim[2]
    width = dim.dim_value
    dim.dim_value = width + 1
    onnx.save(model, folder / "model.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    for spec in manifest["outputs"]:
        if spec["name"] == out.name:
            spec["shape"][2] = width + 1
    digest = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    manifest.update(input_dim=width + 1, output_size=width + 1, onnx_sha256=digest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return width


def run(coro, timeout: float = 60.0):
    """Run a test scenario on a fresh event loop, bounded in time."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def started(models_dir: Path, **settings):
    """A loaded and started Engine (CPU; generation messages never flushed by time, so their
    chunking is deterministic); stopped on exit."""
    settings.setdefault("device", "cpu")
    settings.setdefault("generate_flush_ms", 3_600_000.0)
    engine = Engine(ServerConfig(models=str(models_dir), **settings)).load()
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


class FakeClock:
    """The session table's clock, advanced by hand (``engine.table.clock = FakeClock()``)."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a state of the engine (polling the event loop), failing after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.002)


async def settle(turns: int = 20) -> None:
    """Let the event loop run its ready callbacks a few times (no wall-clock wait)."""
    for _ in range(turns):
        await asyncio.sleep(0)


class Refusal:
    """An error answer in a Collect sink."""

    def __init__(self, session_id: str, tag: int, err: ServeError):
        self.session_id = session_id
        self.tag = tag
        self.err = err

    def __repr__(self) -> str:
        return f"Refusal({self.tag}, {self.err!r})"


class Collect:
    """A StepSink that keeps every answer (StepOutput or Refusal) in arrival order."""

    def __init__(self):
        self.out: list[StepOutput | Refusal] = []
        self._event = asyncio.Event()

    def push(self, result: StepOutput) -> None:
        self.out.append(result)
        self._event.set()

    def push_answers(self, answers: StepAnswers, rows: list[int] | None) -> None:
        self.out.extend(answers.outputs(rows))
        self._event.set()

    def push_error(self, session_id: str, tag: int, err: ServeError) -> None:
        self.out.append(Refusal(session_id, tag, err))
        self._event.set()

    async def wait(self, n: int, timeout: float = 10.0) -> list:
        async def enough():
            while len(self.out) < n:
                self._event.clear()
                await self._event.wait()

        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise AssertionError(f"only {len(self.out)} of {n} answers after {timeout} s: {self.out}") from None
        return self.out

    def by_tag(self) -> dict:
        return {r.tag: r for r in self.out}


async def answer_now(engine: Engine, req: StepRequest) -> StepOutput | ServeError | None:
    """Submit a unary step and let the loop turn a few times: its answer (a result or the refusal),
    or None when nothing answered it (a step that would hang a client)."""
    sink = UnarySink(asyncio.get_running_loop())
    try:
        engine.submit_step(req, sink)
    except ServeError as err:
        return err
    await settle()
    if not sink.future.done():
        sink.future.cancel()
        return None
    exc = sink.future.exception()
    return exc if exc is not None else sink.future.result()


async def tokens_of(agen) -> tuple[list[int], list]:
    """The tokens of an ``engine.generate`` call, all of them, and its chunks."""
    chunks = [chunk async for chunk in agen]
    return [t for c in chunks for t in c.tokens], chunks


async def drain(sink: GenSink, timeout: float = 30.0) -> list[GenerateChunk]:
    """Every chunk of a generation submitted with ``engine.submit_generate`` (raises its error)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks: list[GenerateChunk] = []
    while True:
        while sink.out:
            chunks.append(sink.out.popleft())
        if sink.done:
            if sink.error is not None:
                raise sink.error
            return chunks
        sink.waiter = loop.create_future()
        try:
            await asyncio.wait_for(sink.waiter, max(deadline - loop.time(), 0.0))
        except TimeoutError:
            raise AssertionError(f"generation not done after {timeout} s ({len(chunks)} chunks)") from None


def refusal(err: BaseException | None, reason: Reason) -> ServeError:
    """Assert ``err`` is a ServeError with ``reason``; return it."""
    assert isinstance(err, ServeError), f"expected a {reason} refusal, got {err!r}"
    assert err.reason is reason, f"expected {reason}, got {err!r}"
    return err


async def refused(awaitable, reason: Reason) -> ServeError:
    """Await a call that must fail with ``reason``."""
    try:
        result = await awaitable
    except ServeError as err:
        return refusal(err, reason)
    raise AssertionError(f"expected a {reason} refusal, got {result!r}")


def logits_of(out: StepOutput) -> np.ndarray:
    return np.frombuffer(out.values["logits"], np.float32).reshape(out.steps, out.width)


def torch_logits(model, inputs) -> np.ndarray:
    """PyTorch's logits for every position of ``inputs`` (token ids, or float32 frames [n, dim])
    from the initial state."""
    if model.config.input_kind == "tokens":
        x = torch.tensor([list(inputs)], dtype=torch.int64)
    else:
        x = torch.from_numpy(np.asarray(inputs, np.float32))[None]
    with torch.no_grad():
        logits, _ = model(x, model.init_state(1))
    return logits[0].numpy()


def torch_greedy(model, prompt: list[int], count: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        logits, state = model(torch.tensor([list(prompt)]), model.init_state(1))
        for _ in range(count):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits, state = model(torch.tensor([[token]]), state)
    return out


def assert_close_to_torch(out: StepOutput, model, history: list[int], tol: float = TOL) -> None:
    """The step's last-position logits equal PyTorch's after feeding ``history`` from the start."""
    got = logits_of(out)[-1]
    want = torch_logits(model, history)[-1]
    diff = float(np.abs(got - want).max())
    assert diff < tol, f"logits differ from PyTorch by {diff} after {len(history)} tokens"
