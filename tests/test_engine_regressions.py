"""Regression tests for server bugs the engine tests found, each reproduced through the Engine
(no gRPC): resends waiting on a step that fails or whose session closes, a resend of a refused
step, a generation queued behind a failed step, the idle clock after a cancelled generation, and
generations still being read when the engine stops. Most need the batched scheduler: the naive
mode runs a step inside the call that submits it, so nothing is ever queued behind a step there.
"""

from __future__ import annotations

import pytest

from seqserve.server.config import ServerConfig
from seqserve.server.domain import GenerateRequest, Sampling, StepRequest
from seqserve.server.engine import Engine
from seqserve.server.errors import Reason, ServeError
from seqserve.server.work import GenSink
from tests.engine_support import (
    ENDLESS,
    LIAR_TOKEN,
    LOGITS,
    PROMPT,
    Collect,
    FakeClock,
    Refusal,
    answer_now,
    assert_close_to_torch,
    drain,
    refusal,  # noqa: F401
    run,
    settle,
    started,
    wait_until,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_torch_thread")]


@pytest.mark.parametrize("how", ["its run fails", "its session is closed"])
def test_a_resend_waiting_on_a_queued_step_is_answered_when_the_step_fails(engine_models, how):
    """A client resends a keyed step while the original is still queued (a lost reply, a reconnect):
    the resend waits on the original (session.check_step returns it, the engine adds a follower).
    If the original then fails, or the session is closed, the resend must fail too (it once was
    never answered: a unary Step hung until its deadline)."""
    root, _ = engine_models

    async def scenario():
        async with started(root, batching="on") as engine:
            sid = engine.create_session("liar").session_id
            token = LIAR_TOKEN if how == "its run fails" else 5
            original, resend = Collect(), Collect()
            request = lambda tag: StepRequest(sid, tokens=[token], expected_position=0, tag=tag)  # noqa: E731
            engine.submit_step(request(1), original)  # a fresh session's step queues
            engine.submit_step(request(2), resend)  # the same step again: waits on the original
            if how == "its session is closed":
                engine.close_session(sid)
            (answer,) = await original.wait(1)
            expected = Reason.RUN_FAILED if how == "its run fails" else Reason.SESSION_CLOSED
            assert isinstance(answer, Refusal) and answer.err.reason is expected
            await settle()  # a fix answers the resend together with the original; give the loop a few turns
            assert resend.out, "the resend was never answered"
            (again,) = resend.out
            assert isinstance(again, Refusal) and again.tag == 2 and again.err.reason is expected

    run(scenario())


def test_a_resend_of_a_step_refused_after_an_earlier_failure_is_refused_again(engine_models):
    root, models = engine_models

    async def scenario():
        async with started(root, batching="on") as engine:
            sid, sink = engine.create_session("liar").session_id, Collect()
            engine.submit_stream_step(StepRequest(sid, tokens=[LIAR_TOKEN], expected_position=0, tag=1), sink)
            engine.submit_stream_step(StepRequest(sid, tokens=[5], expected_position=1, tag=2), sink)
            first, second = await sink.wait(2)
            refusal(first.err, Reason.RUN_FAILED)
            refusal(second.err, Reason.EARLIER_STEP_FAILED)
            # the client resends the refused step as it was: it must hear that position 1 is wrong
            outcome = await answer_now(engine, StepRequest(sid, tokens=[5], expected_position=1, tag=3))
            assert outcome is not None, "the resend was never answered"
            assert refusal(outcome, Reason.POSITION_MISMATCH).metadata["actual"] == "0"
            out = await engine.step(StepRequest(sid, tokens=[5], expected_position=0, output=LOGITS))
            assert_close_to_torch(out, models["lm-lstm"], [5])

    run(scenario())


def test_a_generation_queued_behind_a_failed_step_is_refused(engine_models):
    """Generate without a prompt continues from the last step's logits. Queued behind a step, it
    passes check_generate (the queued position is not 0); if that step's run fails, there is
    nothing to continue from, yet the generation runs from the slot's zeroed logits row (greedy:
    token 0, a draw from nothing) at position 0. Expected: it fails (EARLIER_STEP_FAILED or
    NOTHING_TO_CONTINUE), as a keyed step queued there would."""
    root, _ = engine_models

    async def scenario():
        async with started(root, batching="on") as engine:
            sid, sink = engine.create_session("liar").session_id, Collect()
            engine.submit_stream_step(StepRequest(sid, tokens=[LIAR_TOKEN], expected_position=0, tag=1), sink)
            gen = GenSink()
            engine.submit_generate(
                GenerateRequest(sid, max_tokens=3, expected_position=1, sampling=Sampling(temperature=0.0)), gen
            )
            (answer,) = await sink.wait(1)
            refusal(answer.err, Reason.RUN_FAILED)
            try:
                chunks = await drain(gen)
            except ServeError as err:
                assert err.reason in (Reason.EARLIER_STEP_FAILED, Reason.NOTHING_TO_CONTINUE), err
            else:
                raise AssertionError(
                    f"the generation ran from nothing: {[c.tokens for c in chunks]}, "
                    f"ending at position {chunks[-1].position}"
                )
            await wait_until(lambda: not engine.get_session(sid).generating, "the session to be free")
            assert engine.get_session(sid).position == 0

    run(scenario())


def test_a_cancelled_generation_counts_as_a_use_of_its_session(engine_models):
    """A session is busy (never expired) while it generates, and a finished Generate call counts as
    a use (Engine.generate touches it). A cancelled one does not: last_used stays at the start of
    the generation, so after a generation longer than idle_ttl_s the next sweep expires a session
    whose client was using it a moment ago (and gets SESSION_EXPIRED on its next step)."""
    root, _ = engine_models

    async def scenario():
        async with started(root, batching="on", idle_ttl_s=60, max_generate_tokens=ENDLESS) as engine:
            clock = FakeClock()
            engine.table.clock = clock
            sid = engine.create_session("lm-lstm").session_id
            gen = engine.generate(GenerateRequest(sid, max_tokens=ENDLESS, prompt=PROMPT, tokens_per_message=1))
            await gen.__anext__()
            clock.advance(600)  # a long generation (by the table's clock)
            await gen.aclose()  # the client cancels it
            await wait_until(lambda: not engine.get_session(sid).generating, "the cancelled generation to end")
            assert engine.table.sweep() == 0, "the session expired the moment its generation was cancelled"
            assert engine.get_session(sid).session_id == sid

    run(scenario())


@pytest.mark.parametrize("batching", ["on", "off"], ids=["batched", "naive"])
def test_stopping_the_engine_ends_running_generations(engine_models, batching):
    """The gRPC server masks this (it cancels its calls before stopping the engine), but the engine
    is also driven directly (benchmarks, tests, a second front end): after ``await engine.stop()``
    a running generation should end with UNAVAILABLE / SHUTTING_DOWN, not leave its reader hanging."""
    root, _ = engine_models

    async def scenario():
        engine = Engine(ServerConfig(models=str(root), device="cpu", batching=batching, max_generate_tokens=ENDLESS))
        engine.load()
        await engine.start()
        sid = engine.create_session("lm-lstm").session_id
        sink = GenSink()
        engine.submit_generate(GenerateRequest(sid, max_tokens=ENDLESS, prompt=PROMPT, tokens_per_message=1), sink)
        await wait_until(lambda: len(sink.out) > 0, "the generation to start")
        await engine.stop()
        await settle()
        assert sink.done, "the generation's reader was left waiting after engine.stop()"
        assert refusal(sink.error, Reason.SHUTTING_DOWN).code.name == "UNAVAILABLE"

    run(scenario())
