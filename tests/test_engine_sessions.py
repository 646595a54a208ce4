"""The session state machine driven through the Engine (no gRPC): positions, resends, refusals
with their exact Reason and metadata, and a session's close, in both scheduling modes (batching
on, and the naive one-run-per-request mode). Expiry, eviction and limits:
test_engine_session_table.py."""

from __future__ import annotations

import asyncio

import pytest

from seqserve.server.domain import GenerateRequest, StepRequest
from seqserve.server.errors import Code, Reason
from seqserve.server.work import GenSink, UnarySink
from tests.engine_support import (
    ENDLESS,
    LOGITS,
    PROMPT,
    Collect,
    Refusal,
    assert_close_to_torch,
    refusal,
    refused,
    run,
    started,  # noqa: F401
    torch_greedy,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def test_positions_are_checked_and_a_mismatch_names_both(engine_models, batching):
    root, models = engine_models

    async def scenario():
        async with started(root, batching=batching) as engine:
            sid = engine.create_session("lm-lstm").session_id
            assert (await engine.step(StepRequest(sid, tokens=[1, 2, 3], expected_position=0))).position == 3
            err = await refused(
                engine.step(StepRequest(sid, tokens=[4], expected_position=5)), Reason.POSITION_MISMATCH
            )
            assert err.code is Code.FAILED_PRECONDITION
            assert err.metadata == {"expected": "5", "actual": "3", "applied": "3"}
            assert engine.get_session(sid).position == 3  # a refusal changes nothing
            assert (await engine.step(StepRequest(sid, tokens=[4]))).position == 4  # unkeyed: never checked

            # pipelined on a fresh session: positions count the steps queued before them
            fresh, sink = engine.create_session("lm-lstm").session_id, Collect()
            engine.submit_stream_step(StepRequest(fresh, tokens=[1, 2], expected_position=0, tag=1), sink)
            engine.submit_stream_step(StepRequest(fresh, tokens=[3], expected_position=2, output=LOGITS, tag=2), sink)
            engine.submit_stream_step(StepRequest(fresh, tokens=[9], expected_position=0, tag=3), sink)  # stale
            answers = await sink.wait(3)
            assert [a.tag for a in answers] == [1, 2, 3]  # in session order, the refusal too
            assert answers[1].position == 3
            assert_close_to_torch(answers[1], models["lm-lstm"], [1, 2, 3])
            stale = refusal(answers[2].err, Reason.POSITION_MISMATCH)
            # batched, the two steps were still queued when the third was refused; naive runs them at once
            applied = "0" if batching == "on" else "3"
            assert stale.metadata == {"expected": "0", "actual": "3", "applied": applied}
            assert engine.get_session(fresh).position == 3

    run(scenario())


def test_a_resent_step_is_answered_again_without_advancing(engine_models, batching):
    root, models = engine_models
    ref = models["lm-lstm"]

    async def scenario():
        async with started(root, batching=batching) as engine:
            sid = engine.create_session("lm-lstm").session_id
            first = await engine.step(StepRequest(sid, tokens=[10, 11], expected_position=0, output=LOGITS, tag=1))
            again = await engine.step(StepRequest(sid, tokens=[10, 11], expected_position=0, output=LOGITS, tag=2))
            assert (again.tag, again.position) == (2, 2) and again.values == first.values
            assert engine.get_session(sid).position == 2
            # same position with another input, or another output spec: not a resend
            err = await refused(
                engine.step(StepRequest(sid, tokens=[99], expected_position=0)), Reason.POSITION_MISMATCH
            )
            assert err.metadata["expected"] == "0" and err.metadata["actual"] == "2"
            await refused(engine.step(StepRequest(sid, tokens=[10, 11], expected_position=0)), Reason.POSITION_MISMATCH)
            # only the last keyed step is remembered
            await engine.step(StepRequest(sid, tokens=[12], expected_position=2))
            await refused(
                engine.step(StepRequest(sid, tokens=[10, 11], expected_position=0, output=LOGITS)),
                Reason.POSITION_MISMATCH,
            )
            assert (await engine.step(StepRequest(sid, tokens=[12], expected_position=2))).position == 3
            out = await engine.step(StepRequest(sid, tokens=[13], expected_position=3, output=LOGITS))
            assert out.position == 4
            assert_close_to_torch(out, ref, [10, 11, 12, 13])  # every step applied exactly once

            # a resend arriving while the original is still queued: both answered, applied once
            fresh, sink = engine.create_session("lm-lstm").session_id, Collect()
            for tag in (1, 2):
                engine.submit_stream_step(
                    StepRequest(fresh, tokens=[5, 6], expected_position=0, output=LOGITS, tag=tag), sink
                )
            engine.submit_stream_step(StepRequest(fresh, tokens=[7], expected_position=2, output=LOGITS, tag=3), sink)
            answers = await sink.wait(3)
            assert [(a.tag, a.position) for a in answers] == [(1, 2), (2, 2), (3, 3)]
            assert answers[0].values == answers[1].values
            assert_close_to_torch(answers[2], ref, [5, 6, 7])

            # reset forgets the remembered step: the same request is a new step at position 0
            assert engine.reset_session(fresh).position == 0
            out = await engine.step(StepRequest(fresh, tokens=[5, 6], expected_position=0, output=LOGITS, tag=9))
            assert out.position == 2 and engine.get_session(fresh).position == 2
            assert_close_to_torch(out, ref, [5, 6])

    run(scenario())


def test_a_generating_session_refuses_steps_generation_and_reset(engine_models, batching):
    root, models = engine_models

    async def scenario():
        async with started(root, batching=batching, max_generate_tokens=ENDLESS) as engine:
            sid = engine.create_session("lm-lstm").session_id
            # queued, its prompt not yet run (nothing has awaited since)
            queued = engine.submit_generate(GenerateRequest(sid, max_tokens=ENDLESS, prompt=PROMPT), GenSink())
            assert engine.get_session(sid).generating
            err = refusal(await _outcome(engine.step(StepRequest(sid, tokens=[1]))), Reason.SESSION_GENERATING)
            assert err.code is Code.FAILED_PRECONDITION and err.metadata == {"session_id": sid}
            engine.scheduler(queued.session.model).cancel(queued)
            await wait_until(lambda: not engine.get_session(sid).generating, "the queued generation to be dropped")
            assert engine.get_session(sid).position == 0  # cancelled before its prompt ran: nothing applied

            # running, in a cohort: between two awaits it cannot advance, let alone finish
            gen = engine.generate(GenerateRequest(sid, max_tokens=ENDLESS, prompt=PROMPT, tokens_per_message=1))
            first = await gen.__anext__()
            assert len(first.tokens) == 1 and engine.get_session(sid).generating
            checks = [
                (
                    lambda: engine.submit_step(StepRequest(sid, tokens=[1]), UnarySink(_loop())),
                    Reason.SESSION_GENERATING,
                ),
                (
                    lambda: engine.submit_step(StepRequest(sid, tokens=[1], expected_position=7), UnarySink(_loop())),
                    Reason.SESSION_GENERATING,
                ),
                (
                    lambda: engine.submit_generate(GenerateRequest(sid, max_tokens=3), GenSink()),
                    Reason.SESSION_GENERATING,
                ),
                (lambda: engine.reset_session(sid), Reason.SESSION_BUSY),
            ]
            for call, reason in checks:
                with pytest.raises(Exception) as info:
                    call()
                assert refusal(info.value, reason).code is Code.FAILED_PRECONDITION
            # on a stream the refusal is an answer, and it does not wait for the generation to end
            sink = Collect()
            engine.submit_stream_step(StepRequest(sid, tokens=[1], tag=5), sink)
            (answer,) = await sink.wait(1)
            assert isinstance(answer, Refusal) and answer.tag == 5
            refusal(answer.err, Reason.SESSION_GENERATING)
            assert engine.get_session(sid).generating and len((await gen.__anext__()).tokens) == 1
            await gen.aclose()
            await wait_until(lambda: not engine.get_session(sid).generating, "the cancelled generation to end")
            assert engine.reset_session(sid).position == 0
            out = await engine.step(StepRequest(sid, tokens=[4, 2], output=LOGITS))
            assert_close_to_torch(out, models["lm-lstm"], [4, 2])

    run(scenario())


def test_a_refused_stream_step_waits_for_earlier_steps_not_for_the_generation(engine_models):
    """Batched only (the naive mode runs a step inside the call that submits it): a step queued
    before a generation is answered first, then the refusal of a step sent after the generation
    began, while the generation is still running."""
    root, models = engine_models

    async def scenario():
        async with started(root, batching="on", max_generate_tokens=ENDLESS) as engine:
            sid, sink = engine.create_session("lm-lstm").session_id, Collect()
            engine.submit_stream_step(StepRequest(sid, tokens=[4, 2], output=LOGITS, tag=1), sink)
            gen = engine.generate(GenerateRequest(sid, max_tokens=ENDLESS, tokens_per_message=1))
            first = asyncio.ensure_future(gen.__anext__())
            await wait_until(lambda: engine.get_session(sid).generating, "the generation to be queued")
            engine.submit_stream_step(StepRequest(sid, tokens=[1], tag=2), sink)
            step, refused_step = await sink.wait(2)
            assert step.tag == 1 and step.position == 2
            assert_close_to_torch(step, models["lm-lstm"], [4, 2])
            assert isinstance(refused_step, Refusal) and refused_step.tag == 2
            refusal(refused_step.err, Reason.SESSION_GENERATING)
            assert len((await first).tokens) == 1 and engine.get_session(sid).generating
            await gen.aclose()
            await wait_until(lambda: not engine.get_session(sid).generating, "the cancelled generation to end")

    run(scenario())


def test_reset_is_refused_while_steps_are_queued(engine_models):
    """Batched only: the naive mode runs a step inside the call that submits it, so nothing queues."""
    root, models = engine_models

    async def scenario():
        async with started(root, batching="on") as engine:
            sid, sink = engine.create_session("lm-lstm").session_id, Collect()
            engine.submit_stream_step(StepRequest(sid, tokens=[1, 2], tag=1), sink)  # a fresh session's step queues
            with pytest.raises(Exception) as info:
                engine.reset_session(sid)
            err = refusal(info.value, Reason.SESSION_BUSY)
            assert err.code is Code.FAILED_PRECONDITION and "1 step(s) are queued" in err.message
            (answer,) = await sink.wait(1)
            assert answer.position == 2
            assert engine.reset_session(sid).position == 0

    run(scenario())


def test_generate_without_prompt_needs_something_to_continue(engine_models, batching):
    root, models = engine_models
    ref = models["lm-gru"]

    async def scenario():
        async with started(root, batching=batching) as engine:
            sid = engine.create_session("lm-gru").session_id
            err = await refused(_first(engine.generate(GenerateRequest(sid, max_tokens=3))), Reason.NOTHING_TO_CONTINUE)
            assert err.code is Code.FAILED_PRECONDITION and err.metadata == {"session_id": sid}
            await engine.step(StepRequest(sid, tokens=PROMPT))
            engine.reset_session(sid)
            await refused(_first(engine.generate(GenerateRequest(sid, max_tokens=3))), Reason.NOTHING_TO_CONTINUE)
            assert not engine.get_session(sid).generating
            # a step queued (batched: a fresh session's first step) or just run (naive) is enough
            fresh, sink = engine.create_session("lm-gru").session_id, Collect()
            engine.submit_stream_step(StepRequest(fresh, tokens=PROMPT, tag=1), sink)
            tokens = [t async for chunk in engine.generate(GenerateRequest(fresh, max_tokens=5)) for t in chunk.tokens]
            assert tokens == torch_greedy(ref, PROMPT, 5)
            assert engine.get_session(fresh).position == len(PROMPT) + 5 and len(sink.out) == 1

    run(scenario())


def test_closed_sessions_say_so_to_every_later_call(engine_models, batching):
    root, _ = engine_models

    async def scenario():
        async with started(root, batching=batching, ended_record=2) as engine:
            sid = engine.create_session("lm-lstm").session_id
            await engine.step(StepRequest(sid, tokens=[1, 2, 3]))
            assert engine.close_session(sid) == 3
            calls = [
                lambda: engine.get_session(sid),
                lambda: engine.close_session(sid),
                lambda: engine.reset_session(sid),
                lambda: engine.submit_step(StepRequest(sid, tokens=[1]), UnarySink(_loop())),
                lambda: engine.submit_generate(GenerateRequest(sid, max_tokens=2, prompt=[1]), GenSink()),
            ]
            for call in calls:
                with pytest.raises(Exception) as info:
                    call()
                err = refusal(info.value, Reason.SESSION_CLOSED)
                assert err.code is Code.NOT_FOUND and err.metadata["session_id"] == sid and err.metadata["ended_at"]
            sink = Collect()
            engine.submit_stream_step(StepRequest(sid, tokens=[1], tag=4), sink)
            assert isinstance(sink.out[0], Refusal) and sink.out[0].err.reason is Reason.SESSION_CLOSED
            # the record of ended ids is bounded: the oldest is forgotten
            for _ in range(2):
                engine.close_session(engine.create_session("lm-lstm").session_id)
            err = await refused(engine.step(StepRequest(sid, tokens=[1])), Reason.SESSION_NOT_FOUND)
            assert err.code is Code.NOT_FOUND
            # a closed id may be used again by a new session, which starts from scratch
            engine.create_session("lm-lstm", session_id="chosen")
            await engine.step(StepRequest("chosen", tokens=[1, 2]))
            engine.close_session("chosen")
            assert engine.create_session("lm-lstm", session_id="chosen").position == 0
            assert (await engine.step(StepRequest("chosen", tokens=[1]))).position == 1

    run(scenario())


def _loop():
    return asyncio.get_running_loop()


async def _outcome(awaitable):
    try:
        return await awaitable
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


async def _first(agen):
    try:
        return await agen.__anext__()
    finally:
        await agen.aclose()
