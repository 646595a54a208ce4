"""Model runs through the Engine (no gRPC): a failing run fails only its own step, whatever shares
its batch or is queued behind it; batching, the naive mode and the lone-session path give every
session the same numbers; a run in progress survives its session's end."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from seqserve.server.domain import GenerateRequest, OutputSpec, StepRequest
from seqserve.server.errors import Code, Reason
from seqserve.server.work import GenSink
from tests.engine_support import (
    LIAR_TOKEN,
    LOGITS,
    PROMPT,
    TOL,
    Collect,
    Refusal,
    assert_close_to_torch,
    drain,
    logits_of,
    refusal,
    refused,
    run,  # noqa: F401
    started,
    torch_greedy,
    torch_logits,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def stats_of(engine, name: str):
    return engine.scheduler(engine.registry.get(name)).stats


def test_a_failing_run_fails_only_its_own_step(engine_models, batching):
    root, models = engine_models
    ref = models["lm-lstm"]  # the liar's graph

    async def scenario():
        async with started(root, batching=batching) as engine:
            stats = stats_of(engine, "liar")
            sids = [engine.create_session("liar").session_id for _ in range(6)]
            splits, failures, sink = stats.split_runs, stats.failures, Collect()
            for i, sid in enumerate(sids):  # no await in between: batched, all six share one run
                token = LIAR_TOKEN if i == 2 else 40 + i
                engine.submit_stream_step(StepRequest(sid, tokens=[token], output=LOGITS, tag=i), sink)
            await sink.wait(6)
            answers = sink.by_tag()
            err = refusal(answers[2].err, Reason.RUN_FAILED)
            assert err.code is Code.INTERNAL and err.metadata == {"position": "0"}
            assert "unchanged at position 0" in err.message
            for i in (0, 1, 3, 4, 5):
                assert not isinstance(answers[i], Refusal) and answers[i].position == 1
                assert_close_to_torch(answers[i], ref, [40 + i])
            assert stats.failures == failures + 1
            # batched: the shared run failed and was re-run row by row; naive: nothing was shared
            assert stats.split_runs == splits + (batching == "on")
            # the failed session's state and position are untouched; everybody steps on normally
            assert engine.get_session(sids[2]).position == 0
            for i, sid in enumerate(sids):
                out = await engine.step(StepRequest(sid, tokens=[7], output=LOGITS))
                history = [7] if i == 2 else [40 + i, 7]
                assert out.position == len(history)
                assert_close_to_torch(out, ref, history)

    run(scenario())


def test_a_failing_run_in_a_split_tick_fails_only_its_own_step(engine_models):
    """Nine steps in one tick with max_run_rows 3 run as three runs, each answered before the next
    starts. The middle run fails: its rows are re-run one by one, only the liar's step fails, and
    the run after it goes on as usual."""
    root, models = engine_models
    ref = models["lm-lstm"]

    async def scenario():
        async with started(root, max_run_rows=3) as engine:
            stats = stats_of(engine, "liar")
            sids = [engine.create_session("liar").session_id for _ in range(9)]
            runs, splits, failures, sink = stats.runs, stats.split_runs, stats.failures, Collect()
            for i, sid in enumerate(sids):
                engine.submit_stream_step(
                    StepRequest(sid, tokens=[LIAR_TOKEN if i == 4 else 40 + i], output=LOGITS, tag=i), sink
                )
            await sink.wait(9)
            answers = sink.by_tag()
            assert refusal(answers[4].err, Reason.RUN_FAILED).code is Code.INTERNAL
            for i in (0, 1, 2, 3, 5, 6, 7, 8):
                assert not isinstance(answers[i], Refusal) and answers[i].position == 1
                assert_close_to_torch(answers[i], ref, [40 + i])
            # two runs of three, and the failed one's two good rows alone (the liar's counts as a failure)
            assert (stats.runs - runs, stats.split_runs - splits, stats.failures - failures) == (4, 1, 1)
            assert engine.get_session(sids[4]).position == 0
            out = await engine.step(StepRequest(sids[4], tokens=[7], output=LOGITS))
            assert out.position == 1
            assert_close_to_torch(out, ref, [7])

    run(scenario())


def test_steps_pipelined_behind_a_failed_step(engine_models, batching):
    """Keyed steps queued behind a failed step are refused (their position no longer exists);
    unkeyed ones move back and run. Naive, each step runs as it is submitted, so the keyed ones
    meet the unchanged position directly: POSITION_MISMATCH instead of EARLIER_STEP_FAILED."""
    root, models = engine_models
    ref = models["lm-lstm"]

    async def scenario():
        async with started(root, batching=batching) as engine:
            sid, sink = engine.create_session("liar").session_id, Collect()
            requests = [
                StepRequest(sid, tokens=[LIAR_TOKEN], expected_position=0, tag=1),  # fails
                StepRequest(sid, tokens=[5], expected_position=1, tag=2),  # keyed: its position never comes
                StepRequest(sid, tokens=[6], output=LOGITS, tag=3),  # unkeyed: runs at position 0
                StepRequest(sid, tokens=[7, 8], expected_position=3, tag=4),  # keyed
                StepRequest(sid, tokens=[9], output=LOGITS, tag=5),  # unkeyed: runs at position 1
            ]
            for request in requests:
                engine.submit_stream_step(request, sink)
            answers = await sink.wait(5)
            assert [a.tag for a in answers] == [1, 2, 3, 4, 5]  # answered in session order
            refusal(answers[0].err, Reason.RUN_FAILED)
            if batching == "on":
                assert refusal(answers[1].err, Reason.EARLIER_STEP_FAILED).metadata == {"expected": "1", "actual": "0"}
                # where it would start now: behind the unkeyed step that moved back (as naive says)
                assert refusal(answers[3].err, Reason.EARLIER_STEP_FAILED).metadata == {"expected": "3", "actual": "1"}
            else:
                assert refusal(answers[1].err, Reason.POSITION_MISMATCH).metadata == {
                    "expected": "1",
                    "actual": "0",
                    "applied": "0",
                }
                assert refusal(answers[3].err, Reason.POSITION_MISMATCH).metadata == {
                    "expected": "3",
                    "actual": "1",
                    "applied": "1",
                }
            assert answers[1].err.code is answers[3].err.code is Code.FAILED_PRECONDITION
            assert answers[2].position == 1 and answers[4].position == 2
            assert_close_to_torch(answers[2], ref, [6])
            assert_close_to_torch(answers[4], ref, [6, 9])
            assert engine.get_session(sid).position == 2
            out = await engine.step(StepRequest(sid, tokens=[10], expected_position=2, output=LOGITS))
            assert out.position == 3
            assert_close_to_torch(out, ref, [6, 9, 10])

    run(scenario())


def test_a_failing_prompt_fails_only_its_generation(engine_models, batching):
    root, models = engine_models

    async def scenario():
        async with started(root, batching=batching) as engine:
            bad, good = (engine.create_session("liar").session_id for _ in range(2))
            bad_sink, good_sink = GenSink(), GenSink()  # both queued before either runs: batched, one tick
            engine.submit_generate(GenerateRequest(bad, max_tokens=4, prompt=[1, LIAR_TOKEN]), bad_sink)
            engine.submit_generate(GenerateRequest(good, max_tokens=4, prompt=[1, 2]), good_sink)
            with pytest.raises(Exception) as info:
                await drain(bad_sink)
            assert refusal(info.value, Reason.RUN_FAILED).code is Code.INTERNAL
            chunks = await drain(good_sink)
            assert [t for c in chunks for t in c.tokens] == torch_greedy(models["lm-lstm"], [1, 2], 4)
            await wait_until(lambda: not engine.get_session(bad).generating, "the failed generation to end")
            assert engine.get_session(bad).position == 0
            # nothing to continue from: the failed prompt left no logits behind
            await refused(_first(engine.generate(GenerateRequest(bad, max_tokens=2))), Reason.NOTHING_TO_CONTINUE)
            tokens = [
                t async for c in engine.generate(GenerateRequest(bad, max_tokens=5, prompt=PROMPT)) for t in c.tokens
            ]
            assert tokens == torch_greedy(models["lm-lstm"], PROMPT, 5)

    run(scenario())


# -- batching never changes a session's result ----------------------------------------------------
SESSIONS = [
    "lm-lstm",
    "lm-lstm",
    "lm-gru",
    "lm-gru",
    "lm-rnn",
    "lm-rnn",
    "cls-lstm",
    "cls-lstm",
    "feat-gru",
    "feat-gru",
]
LENGTHS = [[1] * 10, [3] * 10, [1, 2] * 5, [2] * 10, [4, 4, 1, 1, 2, 2, 3, 3, 1, 5]]  # per round, per session
SPECS = [OutputSpec(logits=True, top_k=5), OutputSpec(logits=True, all_positions=True)]
MODES = {
    "batched": dict(batching="on"),
    "batched-in-thread": dict(batching="on", run_in_thread=True),
    "naive": dict(batching="off"),
    "lone": dict(batching="on"),  # one session at a time: after its first step, the direct path
}


def _inputs(models) -> list[list[np.ndarray]]:
    """Each session's chunks: token ids, or float32 frames for the features model."""
    rng = np.random.default_rng(21)
    out = []
    for i, name in enumerate(SESSIONS):
        cfg = models[name].config
        chunks = []
        for k in range(len(LENGTHS)):
            n = LENGTHS[k][i]
            chunks.append(
                rng.integers(0, cfg.input_dim, n)
                if cfg.input_kind == "tokens"
                else rng.standard_normal((n, cfg.input_dim)).astype(np.float32)
            )
        out.append(chunks)
    return out


def _request(sid: str, chunk: np.ndarray, k: int) -> StepRequest:
    if chunk.dtype == np.float32:
        return StepRequest(sid, features=chunk.astype("<f4").tobytes(), output=SPECS[k % 2], tag=k)
    return StepRequest(sid, tokens=chunk.tolist(), output=SPECS[k % 2], tag=k)


async def _serve(root, mode: str, inputs) -> tuple[dict, dict]:
    """Each session's answers (round -> StepOutput) and the run counters, for one mode."""
    async with started(root, **MODES[mode]) as engine:
        before = {name: (s.runs, s.rows, s.direct_runs) for name in set(SESSIONS) for s in [stats_of(engine, name)]}
        sids = [engine.create_session(name).session_id for name in SESSIONS]
        answers: dict[int, dict[int, object]] = {i: {} for i in range(len(sids))}
        if mode == "lone":
            for i, sid in enumerate(sids):
                for k, chunk in enumerate(inputs[i]):
                    answers[i][k] = await engine.step(_request(sid, chunk, k))
        else:
            for k in range(len(LENGTHS)):
                sink = Collect()
                for i, sid in enumerate(sids):  # all at once: batched, one tick per model
                    engine.submit_stream_step(_request(sid, inputs[i][k], k), sink)
                for out in await sink.wait(len(sids)):
                    answers[sids.index(out.session_id)][k] = out
        counts = {}
        for name, (runs, rows, direct) in before.items():
            s = stats_of(engine, name)
            counts[name] = (s.runs - runs, s.rows - rows, s.direct_runs - direct)
        return answers, counts


def test_batching_never_changes_a_sessions_result(engine_models):
    """Every cell and input kind, chunks of equal and of different lengths in the same tick, last
    position (with the top-k, from the lone path's head on the CPU) or every position: the same
    numbers batched (on the loop or the model thread), naive or alone, and PyTorch's."""
    root, models = engine_models
    inputs = _inputs(models)
    results = {mode: run(_serve(root, mode, inputs)) for mode in MODES}
    steps = len(SESSIONS) * len(LENGTHS)
    for mode, (answers, counts) in results.items():
        runs = sum(c[0] for c in counts.values())
        rows = sum(c[1] for c in counts.values())
        direct = sum(c[2] for c in counts.values())
        assert rows == steps, (mode, counts)
        if mode.startswith("batched"):  # every model: each round's equal lengths shared a run
            assert all(c[0] < c[1] for c in counts.values()), f"{mode}: a model never shared a run ({counts})"
        if mode in ("naive", "lone"):
            assert runs == rows, f"{mode}: a run carried two sessions ({counts})"
        if mode == "lone":  # every step after a session's first ran at once, not through the queue
            assert direct == steps - len(SESSIONS), counts
        for i, name in enumerate(SESSIONS):
            expected = torch_logits(models[name], np.concatenate(inputs[i]))
            end = 0
            for k, chunk in enumerate(inputs[i]):
                out = answers[i][k]
                end += len(chunk)
                assert out.position == end
                got = logits_of(out)
                want = expected[end - len(chunk) : end] if k % 2 else expected[end - 1 : end]
                assert float(np.abs(got - want).max()) < TOL, (mode, name, i, k)
    naive_answers = results["naive"][0]
    for mode, (answers, _) in results.items():
        for i in range(len(SESSIONS)):
            for k in range(len(LENGTHS)):
                a, b = answers[i][k], naive_answers[i][k]
                diff = float(np.abs(logits_of(a) - logits_of(b)).max())
                assert diff < 1e-5, f"{mode} vs naive: session {i} round {k} logits differ by {diff}"
                if "top_k_ids" in b.values:
                    assert a.values["top_k_ids"] == b.values["top_k_ids"], (mode, i, k)
                    np.testing.assert_allclose(a.values["top_k_logprobs"], b.values["top_k_logprobs"], atol=1e-5)


def test_batching_resumes_when_others_join_a_lone_session(engine_models):
    """A session stepping alone takes the direct path; once others step too, its steps go through
    the queue again and share runs with theirs (what a gRPC test cannot force: there, how steps
    batch depends on how the server happens to read them)."""
    root, models = engine_models
    ref = models["lm-lstm"]
    rng = np.random.default_rng(5)

    async def scenario():
        async with started(root, batching="on") as engine:
            stats = stats_of(engine, "lm-lstm")
            sids = [engine.create_session("lm-lstm").session_id for _ in range(9)]
            history = {sid: [] for sid in sids}
            for _ in range(6):  # the first session alone: queued once, then direct
                tokens = rng.integers(0, 256, 1).tolist()
                history[sids[0]] += tokens
                out = await engine.step(StepRequest(sids[0], tokens=tokens, output=LOGITS))
                assert_close_to_torch(out, ref, history[sids[0]])
            assert stats.direct_runs == 5
            runs, rows, direct = stats.runs, stats.rows, stats.direct_runs
            for k in range(4):  # now all nine at once, the lone one first
                sink = Collect()
                for sid in sids:
                    tokens = rng.integers(0, 256, 1).tolist()
                    history[sid] += tokens
                    engine.submit_stream_step(StepRequest(sid, tokens=tokens, output=LOGITS, tag=k), sink)
                for out in await sink.wait(9):
                    assert_close_to_torch(out, ref, history[out.session_id])
            # the lone session's first step of round 0 still ran at once (it was alone until then);
            # after that all nine share one run per round: 1 + 1 (eight rows) + 3 (nine rows)
            assert stats.direct_runs == direct + 1
            assert (stats.rows - rows, stats.runs - runs) == (36, 5)
            out = await engine.step(StepRequest(sids[3], tokens=[1], output=LOGITS))
            assert_close_to_torch(out, ref, history[sids[3]] + [1])

    run(scenario())


def test_a_run_in_progress_outlives_its_sessions_close(engine_models):
    """Step runs on the model thread (run_in_thread), held there by a gate: closing the session
    mid-run fails the steps queued behind it at once, lets the running one complete, and gives
    the slot back only when the run is over."""
    root, models = engine_models

    async def scenario():
        async with started(root, batching="on", run_in_thread=True) as engine:
            model = engine.registry.get("lm-lstm")
            runtime, store = model.runtime, model.runtime.store
            gate, real_run = threading.Event(), runtime.run
            runtime.run = lambda x, slots: (gate.wait(30), real_run(x, slots))[1]
            try:
                in_use = store.in_use
                sid, sink = engine.create_session("lm-lstm").session_id, Collect()
                engine.submit_stream_step(StepRequest(sid, tokens=[4, 2], output=LOGITS, tag=1), sink)
                engine.submit_stream_step(StepRequest(sid, tokens=[3], tag=2), sink)
                session = engine.table.sessions[sid]
                await wait_until(lambda: session.busy, "the step's run to start")
                assert engine.close_session(sid) == 0
                (queued,) = sink.out  # the queued step failed at once
                assert queued.tag == 2 and refusal(queued.err, Reason.SESSION_CLOSED).code is Code.NOT_FOUND
                assert store.in_use == in_use + 1  # the run still holds the slot
                gate.set()
                answers = await sink.wait(2)
                assert answers[1].tag == 1 and answers[1].position == 2
                assert_close_to_torch(answers[1], models["lm-lstm"], [4, 2])
                await wait_until(lambda: store.in_use == in_use, "the slot to come back")
                await refused(engine.step(StepRequest(sid, tokens=[1])), Reason.SESSION_CLOSED)
                fresh = engine.create_session("lm-lstm").session_id  # reuses the slot: from the initial state
                out = await engine.step(StepRequest(fresh, tokens=[9, 8], output=LOGITS))
                assert_close_to_torch(out, models["lm-lstm"], [9, 8])
            finally:
                gate.set()
                runtime.run = real_run

    run(scenario())


async def _first(agen):
    try:
        return await agen.__anext__()
    finally:
        await agen.aclose()
