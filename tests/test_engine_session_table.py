"""The table of open sessions driven through the Engine (no gRPC): idle sessions expiring by the
table's clock, the least recently used idle session evicted at a limit (never one with queued
work), and the limits per model and the refuse mode, in both scheduling modes."""

from __future__ import annotations

import pytest

from seqserve.server.domain import FinishReason, GenerateRequest, StepRequest
from seqserve.server.errors import Code, Reason
from tests.engine_support import (
    ENDLESS,
    LOGITS,
    Collect,
    FakeClock,
    assert_close_to_torch,
    refusal,
    refused,
    run,
    started,  # noqa: F401
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def test_idle_sessions_expire_by_the_tables_clock(engine_models, batching):
    """Expiry is decided by the session table's clock, driven here by hand: no wall-time TTL.
    The real sweeper task does the expiring (period 50 ms of real time for this TTL)."""
    root, _ = engine_models

    async def scenario():
        async with started(root, batching=batching, idle_ttl_s=0.2, max_generate_tokens=ENDLESS) as engine:
            clock = FakeClock()
            engine.table.clock = clock
            idle, active = (engine.create_session("lm-lstm").session_id for _ in range(2))
            assert engine.get_session(idle).expires_unix_ms == int((clock.now + 0.2) * 1000)
            for _ in range(10):  # 10 x 0.15 s: far past the TTL in total, never idle that long
                clock.advance(0.15)
                await engine.step(StepRequest(active, tokens=[1]))
            await wait_until(lambda: idle not in engine.table.sessions, "the sweeper to expire the idle session")
            err = await refused(engine.step(StepRequest(idle, tokens=[1])), Reason.SESSION_EXPIRED)
            assert err.code is Code.NOT_FOUND and "0.2 s idle" in err.message
            assert engine.get_session(active).position == 10
            assert engine.table.counts["expired"] == 1

            # a generating session is never expired, however old its last use; its end counts as a use
            # long enough that it is still running when its first message arrives (a lone generation
            # feeds several tokens per turn of the event loop), and the test does not await meanwhile
            gen = engine.generate(GenerateRequest(active, max_tokens=2000, tokens_per_message=1))
            await gen.__anext__()
            clock.advance(100)
            assert engine.table.sweep() == 0 and engine.get_session(active).generating
            rest = [chunk async for chunk in gen]
            assert rest[-1].finish is FinishReason.LENGTH
            assert engine.table.sweep() == 0 and active in engine.table.sessions  # touched when the call ended
            clock.advance(0.3)
            await wait_until(lambda: active not in engine.table.sessions, "the sweeper to expire the session")
            refusal(engine.table.missing(active), Reason.SESSION_EXPIRED)

    run(scenario())


def test_eviction_takes_the_least_recently_used_idle_session(engine_models, batching):
    root, _ = engine_models

    async def scenario():
        async with started(root, batching=batching, max_sessions=3, max_generate_tokens=ENDLESS) as engine:
            a, b, c = (engine.create_session("lm-lstm").session_id for _ in range(3))
            await engine.step(StepRequest(a, tokens=[1]))  # b is now the least recently used
            d = engine.create_session("lm-lstm").session_id
            err = await refused(engine.step(StepRequest(b, tokens=[1])), Reason.SESSION_EVICTED)
            assert err.code is Code.NOT_FOUND and "evicted" in err.message
            # c generates, then a and d are used: c is the least recently used, but busy
            gen_c = engine.generate(GenerateRequest(c, max_tokens=ENDLESS, prompt=[1], tokens_per_message=1))
            await gen_c.__anext__()
            await engine.step(StepRequest(a, tokens=[2]))
            await engine.step(StepRequest(d, tokens=[2]))
            assert list(engine.table.sessions)[0] == c and engine.get_session(c).generating
            e = engine.create_session("lm-lstm").session_id
            assert sorted(engine.table.sessions) == sorted([c, d, e])  # a went, not c
            refusal(engine.table.missing(a), Reason.SESSION_EVICTED)
            # every session busy: nothing can be evicted
            gens = [gen_c]
            for sid in (d, e):
                gens.append(engine.generate(GenerateRequest(sid, max_tokens=ENDLESS, prompt=[3], tokens_per_message=1)))
                await gens[-1].__anext__()
            assert all(engine.get_session(s).generating for s in (c, d, e))
            with pytest.raises(Exception) as info:
                engine.create_session("lm-lstm")
            err = refusal(info.value, Reason.ALL_SESSIONS_BUSY)
            assert err.code is Code.RESOURCE_EXHAUSTED and err.metadata == {"setting": "max_sessions", "limit": "3"}
            assert sorted(engine.table.sessions) == sorted([c, d, e]) and engine.table.counts["evicted"] == 2
            for gen in gens:
                await gen.aclose()
            await wait_until(
                lambda: not any(engine.get_session(s).generating for s in (c, d, e)), "the cancelled generations to end"
            )
            engine.create_session("lm-lstm")
            assert engine.table.counts["evicted"] == 3

    run(scenario())


def test_eviction_skips_sessions_with_queued_steps(engine_models):
    """Batched only (naive steps never queue)."""
    root, models = engine_models

    async def scenario():
        async with started(root, batching="on", max_sessions=2) as engine:
            a, b = (engine.create_session("lm-lstm").session_id for _ in range(2))
            sink = Collect()
            engine.submit_stream_step(StepRequest(a, tokens=[4, 2], output=LOGITS, tag=1), sink)  # queued
            engine.reset_session(b)  # a use of b (synchronous): a, with its queued step, is least recent
            assert list(engine.table.sessions)[0] == a and not engine.table.sessions[a].idle
            c = engine.create_session("lm-lstm").session_id
            assert sorted(engine.table.sessions) == sorted([a, c])
            (answer,) = await sink.wait(1)
            assert answer.position == 2  # the queued step ran, unharmed
            assert_close_to_torch(answer, models["lm-lstm"], [4, 2])

    run(scenario())


def test_limits_per_model_and_refuse_mode(engine_models, batching):
    root, _ = engine_models

    async def scenario():
        async with started(
            root, batching=batching, max_sessions=3, max_sessions_per_model=2, when_full="refuse"
        ) as engine:
            engine.create_session("lm-lstm"), engine.create_session("lm-lstm")
            with pytest.raises(Exception) as info:
                engine.create_session("lm-lstm")
            err = refusal(info.value, Reason.SESSION_LIMIT)
            assert err.code is Code.RESOURCE_EXHAUSTED
            assert err.metadata == {"setting": "max_sessions_per_model", "limit": "2"}
            engine.create_session("lm-gru")
            with pytest.raises(Exception) as info:
                engine.create_session("cls-lstm")
            assert refusal(info.value, Reason.SESSION_LIMIT).metadata == {"setting": "max_sessions", "limit": "3"}
        async with started(root, batching=batching, max_sessions_per_model=1, max_generate_tokens=ENDLESS) as engine:
            busy = engine.create_session("lm-lstm").session_id
            other = engine.create_session("lm-gru").session_id  # idle, but another model's
            gen = engine.generate(GenerateRequest(busy, max_tokens=ENDLESS, prompt=[1], tokens_per_message=1))
            await gen.__anext__()
            with pytest.raises(Exception) as info:
                engine.create_session("lm-lstm")
            err = refusal(info.value, Reason.ALL_SESSIONS_BUSY)
            assert err.metadata == {"setting": "max_sessions_per_model", "limit": "1"}
            assert sorted(engine.table.sessions) == sorted([busy, other])
            await gen.aclose()

    run(scenario())
