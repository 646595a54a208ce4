"""Chunked prefill (server/chunks.py): a long step or prompt runs in pieces between other sessions'
steps, and gives exactly what one whole run gives (PyTorch's numbers for the whole sequence)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest

from seqserve.server.domain import GenerateRequest, OutputSpec, Sampling, StepRequest
from seqserve.server.errors import Code, Reason
from seqserve.server.work import GenSink
from tests.engine_support import (
    LIAR_TOKEN,
    LOGITS,
    TOL,
    Collect,
    Refusal,
    drain,
    logits_of,
    refusal,
    run,
    started,
    torch_greedy,
    torch_logits,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]
CHUNK = 16
EVERY = OutputSpec(logits=True, all_positions=True)


def _input(model, n: int, rng) -> np.ndarray:
    cfg = model.config
    if cfg.input_kind == "tokens":
        return rng.integers(0, cfg.input_dim, n)
    return rng.standard_normal((n, cfg.input_dim)).astype(np.float32)


def _request(sid: str, x: np.ndarray, output: OutputSpec, tag: int = 0) -> StepRequest:
    if x.dtype.kind == "f":
        return StepRequest(sid, features=x.astype("<f4").tobytes(), output=output, tag=tag)
    return StepRequest(sid, tokens=[int(t) for t in x], output=output, tag=tag)


def test_chunked_steps_equal_whole_runs_on_every_model(engine_models):
    """Lengths around the chunk (one piece, a last piece of one position, several pieces) on every
    cell and input kind, asking for the last position or for every one, all queued at once so
    pieces share runs with each other and with whole steps of the same length."""
    root, models = engine_models
    rng = np.random.default_rng(3)
    names = ["lm-lstm", "lm-gru", "lm-rnn", "cls-lstm", "feat-gru"]
    lengths = [CHUNK, CHUNK + 1, 3 * CHUNK + 5, 2 * CHUNK]
    plans = [(name, n, k % 2 == 0) for name in names for k, n in enumerate(lengths)]
    xs = [(_input(models[name], n, rng), _input(models[name], 3, rng)) for name, n, _ in plans]

    async def scenario():
        async with started(root, max_prefill_chunk=CHUNK) as engine:
            stats = [engine.scheduler(engine.registry.get(name)).stats for name in names]
            runs0 = sum(s.runs for s in stats)
            sids = [engine.create_session(name).session_id for name, _, _ in plans]
            sink = Collect()
            for i, ((_, _, every), sid) in enumerate(zip(plans, sids)):  # no await: all in the queue at once
                engine.submit_stream_step(_request(sid, xs[i][0], EVERY if every else LOGITS, tag=2 * i), sink)
                engine.submit_stream_step(_request(sid, xs[i][1], LOGITS, tag=2 * i + 1), sink)
            await sink.wait(2 * len(plans))
            runs = sum(s.runs for s in stats) - runs0
            positions = [engine.get_session(sid).position for sid in sids]
            return sink.by_tag(), runs, positions

    answers, runs, positions = run(scenario())
    for i, (name, n, every) in enumerate(plans):
        long, short = answers[2 * i], answers[2 * i + 1]
        assert not isinstance(long, Refusal) and not isinstance(short, Refusal), (name, n, long, short)
        want = torch_logits(models[name], np.concatenate(xs[i]))
        assert long.position == n and short.position == n + 3 and positions[i] == n + 3
        got = logits_of(long)
        assert got.shape[0] == (n if every else 1)
        diff = float(np.abs(got - (want[:n] if every else want[n - 1 : n])).max())
        assert diff < TOL, f"{name}, {n} positions{' (every one)' if every else ''}: max diff {diff}"
        diff = float(np.abs(logits_of(short) - want[-1:]).max())
        assert diff < TOL, f"{name}: the step after a chunked one differs by {diff}"
    # pieces of equal length shared runs: far fewer runs than pieces plus steps
    pieces = sum(-(-n // CHUNK) for _, n, _ in plans)
    assert runs < pieces + len(plans), (runs, pieces)


def test_other_sessions_step_while_a_long_step_runs_in_pieces(engine_models):
    root, models = engine_models
    model = models["lm-lstm"]
    rng = np.random.default_rng(5)
    long_x = _input(model, 10 * CHUNK, rng)

    async def scenario():
        async with started(root, max_prefill_chunk=CHUNK) as engine:
            a, b = (engine.create_session("lm-lstm").session_id for _ in range(2))
            sink = Collect()
            engine.submit_stream_step(_request(a, long_x, LOGITS), sink)
            history, between = [], 0
            while not sink.out:  # B steps in a closed loop until A's long step is answered
                token = int(rng.integers(0, 256))
                out = await engine.step(StepRequest(b, tokens=[token], output=LOGITS))
                # B steps alone, at once, without a hop through the loop: yield as a client's
                # next read would, so the pieces' runs (on the model thread) can report back
                await asyncio.sleep(0)
                history.append(token)
                between += not sink.out
                assert float(np.abs(logits_of(out)[-1] - torch_logits(model, history)[-1]).max()) < TOL
            return sink.out[0], between

    long_out, between = run(scenario())
    # B kept stepping while A's pieces ran, not only after all of them
    assert between >= 8, f"only {between} steps of another session ran during a 10-piece step"
    assert long_out.position == 10 * CHUNK
    assert float(np.abs(logits_of(long_out)[-1] - torch_logits(model, long_x)[-1]).max()) < TOL


def test_a_run_failing_halfway_leaves_the_state_as_before(engine_models):
    """The liar's run fails at a token in the third piece: the two pieces that ran are undone."""
    root, models = engine_models
    ref = models["lm-lstm"]  # the liar's graph
    tokens = [(7 * i) % 256 for i in range(3 * CHUNK)]
    tokens[2 * CHUNK + 3] = LIAR_TOKEN

    async def scenario():
        async with started(root, max_prefill_chunk=CHUNK) as engine:
            sid = engine.create_session("liar").session_id
            await engine.step(StepRequest(sid, tokens=[5, 6], output=LOGITS))
            sink = Collect()
            engine.submit_stream_step(StepRequest(sid, tokens=tokens, output=LOGITS), sink)
            [answer] = await sink.wait(1)
            after = await engine.step(StepRequest(sid, tokens=[9], output=LOGITS))
            return answer, after

    answer, after = run(scenario())
    err = refusal(answer.err, Reason.RUN_FAILED)
    assert err.code is Code.INTERNAL and err.metadata == {"position": "2"}
    assert after.position == 3
    assert float(np.abs(logits_of(after)[-1] - torch_logits(ref, [5, 6, 9])[-1]).max()) < TOL


def test_a_long_prompt_generates_what_a_whole_run_does(engine_models):
    root, models = engine_models
    model = models["lm-gru"]
    prompt = [(13 * i + 1) % 256 for i in range(5 * CHUNK + 3)]

    async def scenario():
        async with started(root, max_prefill_chunk=CHUNK) as engine:
            sid = engine.create_session("lm-gru").session_id
            sink = GenSink()
            engine.submit_generate(GenerateRequest(sid, max_tokens=12, prompt=prompt, sampling=Sampling()), sink)
            chunks = await drain(sink)
            return [t for c in chunks for t in c.tokens], engine.get_session(sid).position

    tokens, position = run(scenario())
    assert tokens == torch_greedy(model, prompt, 12)
    assert position == len(prompt) + 12


def test_closing_a_session_halfway_through_a_long_step_refuses_it_and_frees_its_slot(engine_models):
    root, models = engine_models
    rng = np.random.default_rng(9)
    long_x = _input(models["lm-lstm"], 10 * CHUNK, rng)

    async def scenario():
        async with started(root, max_prefill_chunk=CHUNK) as engine:
            store = engine.registry.get("lm-lstm").runtime.store
            a, b = (engine.create_session("lm-lstm").session_id for _ in range(2))
            in_use = store.in_use
            sink = Collect()
            engine.submit_stream_step(_request(a, long_x, LOGITS), sink)
            for token in (3, 4):  # two ticks: two pieces of A's step ran
                await engine.step(StepRequest(b, tokens=[token], output=LOGITS))
            assert not sink.out
            engine.close_session(a)
            [answer] = await sink.wait(1)
            out = await engine.step(StepRequest(b, tokens=[5], output=LOGITS))
            await wait_until(lambda: store.in_use == in_use - 1, "A's slot to come back")
            return answer, out

    answer, out = run(scenario())
    assert refusal(answer.err, Reason.SESSION_CLOSED).code is Code.NOT_FOUND
    assert out.position == 3
    assert float(np.abs(logits_of(out)[-1] - torch_logits(models["lm-lstm"], [3, 4, 5])[-1]).max()) < TOL


def test_a_tick_of_more_than_max_run_rows_steps_runs_in_equal_runs(engine_models):
    """20 sessions' steps queued at once with max_run_rows 8: one tick, three runs (7, 7, 6 rows),
    and every answer PyTorch's."""
    root, models = engine_models
    model = models["lm-gru"]
    rng = np.random.default_rng(12)
    xs = [_input(model, 3, rng) for _ in range(20)]

    async def scenario():
        async with started(root, max_run_rows=8) as engine:
            stats = engine.scheduler(engine.registry.get("lm-gru")).stats
            sids = [engine.create_session("lm-gru").session_id for _ in xs]
            before = (stats.runs, stats.rows)
            sink = Collect()
            for i, (sid, x) in enumerate(zip(sids, xs)):
                engine.submit_stream_step(_request(sid, x, LOGITS, tag=i), sink)
            await sink.wait(len(xs))
            return sink.by_tag(), (stats.runs - before[0], stats.rows - before[1])

    answers, (runs, rows) = run(scenario())
    assert (runs, rows) == (3, 20)
    for i, x in enumerate(xs):
        assert float(np.abs(logits_of(answers[i])[-1] - torch_logits(model, x)[-1]).max()) < TOL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_pieces_run_on_a_thread_of_their_own_at_a_lower_priority(engine_models):
    """On a CPU, pieces run on their own thread, ``prefill_nice`` lower in OS priority than the
    rest of the server (the event loop here), so that busy cores serve other sessions' steps first."""
    root, models = engine_models
    x = _input(models["lm-lstm"], 4 * CHUNK, np.random.default_rng(9))

    def pieces_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("pieces-lm-lstm")]

    def nice(thread: threading.Thread) -> int:
        assert thread.native_id is not None
        return os.getpriority(os.PRIO_PROCESS, thread.native_id)

    async def scenario(setting: int) -> tuple[int, int, int]:
        async with started(root, max_prefill_chunk=CHUNK, prefill_nice=setting) as engine:
            sid = engine.create_session("lm-lstm").session_id
            assert not pieces_threads()  # made when the first piece runs
            out = await engine.step(_request(sid, x, LOGITS))
            (thread,) = pieces_threads()
            return out.position, nice(threading.current_thread()), nice(thread)

    for setting in (7, 0):
        position, loop_nice, pieces_nice = run(scenario(setting))
        assert position == 4 * CHUNK
        assert pieces_nice == min(19, loop_nice + setting), (setting, loop_nice, pieces_nice)
