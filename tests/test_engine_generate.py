"""Generation through the Engine (no gRPC): how it ends (length, stop sequence, cancel, the
session's close, a failed run), what position and state it leaves, and that evictions and other
sessions around it never disturb it; batched (generation lanes) and naive. How the lanes place
and share generations: test_engine_lanes.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from seqserve.server.domain import FinishReason, GenerateRequest, Sampling, StepRequest
from seqserve.server.errors import Code, Reason
from seqserve.server.work import GenSink
from tests.engine_support import (
    ENDLESS,
    LOGITS,
    MARGIN,
    PROMPT,
    TOL,
    Collect,
    assert_close_to_torch,
    drain,  # noqa: F401
    logits_of,
    overreaching_bundle,
    refusal,
    refused,
    run,
    started,
    tokens_of,
    torch_greedy,
    torch_logits,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def test_generation_ends_at_max_tokens_with_prompt_and_tokens_in_the_state(engine_models, batching):
    root, models = engine_models
    ref = models["lm-lstm"]

    async def scenario():
        async with started(root, batching=batching) as engine:
            sid = engine.create_session("lm-lstm").session_id
            tokens, chunks = await tokens_of(
                engine.generate(GenerateRequest(sid, max_tokens=20, prompt=PROMPT, tokens_per_message=4))
            )
            assert tokens == torch_greedy(ref, PROMPT, 20)
            assert [len(c.tokens) for c in chunks] == [4] * 5
            assert [c.finish for c in chunks] == [None] * 4 + [FinishReason.LENGTH]
            assert [c.position for c in chunks] == [len(PROMPT) + n for n in (4, 8, 12, 16, 20)]
            view = engine.get_session(sid)
            assert view.position == len(PROMPT) + 20 and not view.generating
            out = await engine.step(StepRequest(sid, tokens=[65], expected_position=len(PROMPT) + 20, output=LOGITS))
            assert_close_to_torch(out, ref, PROMPT + tokens + [65])
            # without a prompt it continues from that step
            more, chunks = await tokens_of(engine.generate(GenerateRequest(sid, max_tokens=3)))
            assert more == torch_greedy(ref, PROMPT + tokens + [65], 3)
            assert chunks[-1].position == engine.get_session(sid).position == len(PROMPT) + 20 + 1 + 3

    run(scenario())


def test_generation_ends_after_a_stop_sequence(engine_models, batching):
    root, models = engine_models

    async def scenario():
        async with started(root, batching=batching) as engine:
            sampling = Sampling(temperature=1.0, seed=7)
            chain, _ = await tokens_of(
                engine.generate(
                    GenerateRequest(
                        engine.create_session("lm-lstm").session_id, max_tokens=40, prompt=PROMPT, sampling=sampling
                    )
                )
            )
            assert len(chain) == 40
            # a two-byte stop whose first occurrence in the chain ends at index `end` (>= 3)
            end = next(i for i in range(3, 40) if bytes(chain[i - 1 : i + 1]) not in bytes(chain[:i]))
            stop = bytes(chain[end - 1 : end + 1])
            sid = engine.create_session("lm-lstm").session_id
            tokens, chunks = await tokens_of(
                engine.generate(
                    GenerateRequest(
                        sid,
                        max_tokens=40,
                        prompt=PROMPT,
                        sampling=sampling,
                        stops=[b"\x00\x01\x02", stop],
                        tokens_per_message=1,
                    )
                )
            )  # the stop spans two messages
            assert tokens == chain[: end + 1]
            assert chunks[-1].finish is FinishReason.STOP and all(c.finish is None for c in chunks[:-1])
            assert chunks[-1].position == engine.get_session(sid).position == len(PROMPT) + end + 1
            out = await engine.step(StepRequest(sid, tokens=[65], output=LOGITS))
            assert_close_to_torch(out, models["lm-lstm"], PROMPT + tokens + [65])

    run(scenario())


@pytest.mark.parametrize("how", ["aclose", "task-cancel"])
def test_cancelling_a_generation_keeps_the_tokens_fed_so_far(engine_models, batching, how):
    """Closing the async iterator early (what the API does when a call goes away), or cancelling
    the task reading it: the generation stops at its next round; the session keeps exactly the
    prompt and the generated tokens that were fed, its position counts them, and steps go on."""
    root, models = engine_models
    ref = models["lm-lstm"]

    async def scenario():
        async with started(root, batching=batching, max_generate_tokens=ENDLESS) as engine:
            sid = engine.create_session("lm-lstm").session_id
            agen = engine.generate(GenerateRequest(sid, max_tokens=ENDLESS, prompt=PROMPT, tokens_per_message=1))
            received: list[int] = []
            if how == "aclose":
                for _ in range(3):
                    received += (await agen.__anext__()).tokens
                await agen.aclose()
            else:
                three = asyncio.Event()

                async def reader():
                    async for chunk in agen:
                        received.extend(chunk.tokens)
                        if len(received) == 3:
                            three.set()

                task = asyncio.create_task(reader())
                await asyncio.wait_for(three.wait(), 10)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await wait_until(lambda: not engine.get_session(sid).generating, "the generation to stop")
            position = engine.get_session(sid).position
            fed = position - len(PROMPT)
            assert 2 <= fed < 1000, f"{fed} generated tokens fed"
            chain = torch_greedy(ref, PROMPT, max(fed, len(received)))
            assert received == chain[: len(received)]
            out = await engine.step(StepRequest(sid, tokens=[65], expected_position=position, output=LOGITS))
            assert out.position == position + 1 == engine.get_session(sid).position
            assert_close_to_torch(out, ref, PROMPT + chain[:fed] + [65])
            assert engine.idle

    run(scenario())


def test_a_generation_cancelled_before_its_prompt_ran_applies_nothing(engine_models, batching):
    root, models = engine_models

    async def scenario():
        async with started(root, batching=batching) as engine:
            sid = engine.create_session("lm-lstm").session_id
            await engine.step(StepRequest(sid, tokens=[1, 2]))
            item = engine.submit_generate(GenerateRequest(sid, max_tokens=5, prompt=PROMPT), GenSink())
            engine.scheduler(item.session.model).cancel(item)
            await wait_until(lambda: not engine.get_session(sid).generating, "the cancelled generation to go")
            assert engine.get_session(sid).position == 2
            out = await engine.step(StepRequest(sid, tokens=[3], expected_position=2, output=LOGITS))
            assert_close_to_torch(out, models["lm-lstm"], [1, 2, 3])

    run(scenario())


def test_closing_a_generating_session_ends_its_call_and_frees_its_slot(engine_models, batching):
    root, models = engine_models

    async def scenario():
        async with started(root, batching=batching, max_generate_tokens=ENDLESS) as engine:
            store = engine.registry.get("lm-lstm").runtime.store
            in_use = store.in_use
            sid = engine.create_session("lm-lstm").session_id
            agen = engine.generate(GenerateRequest(sid, max_tokens=ENDLESS, prompt=PROMPT, tokens_per_message=1))
            await agen.__anext__()
            assert engine.get_session(sid).generating and store.in_use == in_use + 1
            position = engine.close_session(sid)
            assert position >= len(PROMPT)
            with pytest.raises(Exception) as info:
                while True:  # chunks already made may still come; then the error
                    await agen.__anext__()
            err = refusal(info.value, Reason.SESSION_CLOSED)
            assert err.code is Code.NOT_FOUND and err.metadata["session_id"] == sid
            await wait_until(lambda: store.in_use == in_use, "the generating session's slot to come back")
            await wait_until(lambda: engine.idle, "the scheduler to be idle")
            with pytest.raises(Exception) as info:
                engine.get_session(sid)
            refusal(info.value, Reason.SESSION_CLOSED)

            # closed while its generation is still queued (prompt not run): fails at once, slot back at once
            sid = engine.create_session("lm-lstm").session_id
            sink = GenSink()
            engine.submit_generate(GenerateRequest(sid, max_tokens=5, prompt=PROMPT), sink)
            engine.close_session(sid)
            assert sink.done and refusal(sink.error, Reason.SESSION_CLOSED) and store.in_use == in_use
            await wait_until(lambda: engine.idle, "the scheduler to be idle")

            fresh = engine.create_session("lm-lstm").session_id  # reuses a freed slot: from the initial state
            out = await engine.step(StepRequest(fresh, tokens=[4, 2], output=LOGITS))
            assert_close_to_torch(out, models["lm-lstm"], [4, 2])

    run(scenario())


def test_closing_a_session_fails_its_queued_steps_in_order(engine_models):
    """Batched only (naive steps never queue)."""
    root, _ = engine_models

    async def scenario():
        async with started(root, batching="on") as engine:
            store = engine.registry.get("lm-lstm").runtime.store
            in_use = store.in_use
            sid, sink = engine.create_session("lm-lstm").session_id, Collect()
            for i in range(5):
                engine.submit_stream_step(StepRequest(sid, tokens=[i], tag=i), sink)
            engine.close_session(sid)
            assert [a.tag for a in sink.out] == list(range(5))
            assert all(refusal(a.err, Reason.SESSION_CLOSED) for a in sink.out)
            assert store.in_use == in_use
            await wait_until(lambda: engine.idle, "the scheduler to be idle")
            assert len(sink.out) == 5

    run(scenario())


def test_evictions_around_a_generation_never_touch_it(engine_models, batching):
    """With the session limit reached, new sessions evict idle ones while a generation runs; the
    generating session is never the victim and its tokens stay its own greedy chain, while the
    new sessions (on reused slots) step from the initial state."""
    root, models = engine_models
    ref = models["lm-lstm"]

    async def scenario():
        async with started(root, batching=batching, max_sessions=3) as engine:
            gen_sid = engine.create_session("lm-lstm").session_id
            agen = engine.generate(GenerateRequest(gen_sid, max_tokens=200, prompt=PROMPT, tokens_per_message=1))
            tokens = list((await agen.__anext__()).tokens)
            others = [engine.create_session("lm-lstm").session_id for _ in range(2)]
            created_while_generating = 0
            for i in range(6):
                # once its generation has ended the session is idle, and may be evicted like any other
                generating = gen_sid in engine.table.sessions and engine.get_session(gen_sid).generating
                new = engine.create_session("lm-lstm").session_id  # at the limit: evicts someone
                assert gen_sid in engine.table.sessions or not generating
                created_while_generating += generating
                out = await engine.step(StepRequest(new, tokens=[i, i + 1], output=LOGITS))
                assert_close_to_torch(out, ref, [i, i + 1])
                others.append(new)
            assert created_while_generating >= 1  # the first one for sure: nothing awaited since the first chunk
            assert engine.table.counts["evicted"] == 6
            tokens += [t async for chunk in agen for t in chunk.tokens]
            assert tokens == torch_greedy(ref, PROMPT, 200)

    run(scenario())


def test_a_generation_whose_run_fails_midway_keeps_the_tokens_fed_before(engine_models, batching, tmp_path):
    """The overreaching model draws an id past its embedding where lm-lstm would draw its fourth
    greedy token, so the run that would feed it fails: the call ends with RUN_FAILED, the session
    holds the prompt and the three tokens fed before (position and state), its next step goes on
    from there, and a second Generate draws the same bad id again and fails the same way."""
    root, models = engine_models
    ref = models["lm-lstm"]
    chain = torch_greedy(ref, PROMPT, 4)
    steps = torch_logits(ref, PROMPT + chain[:3])[len(PROMPT) - 1 :]  # what each of the four draws sees
    # the extra column must lose the first three draws and win the fourth
    assert all(row[chain[i]] - row[chain[3]] > 10 * MARGIN for i, row in enumerate(steps[:3])), "pick another prompt"
    bad = overreaching_bundle(root, "lm-lstm", tmp_path, "overreach", shadow=chain[3])

    async def scenario():
        async with started(tmp_path, batching=batching) as engine:
            sid = engine.create_session("overreach").session_id
            request = GenerateRequest(sid, max_tokens=32, prompt=PROMPT, tokens_per_message=16)
            err = await refused(tokens_of(engine.generate(request)), Reason.RUN_FAILED)
            assert err.code is Code.INTERNAL
            await wait_until(lambda: not engine.get_session(sid).generating, "the failed generation to leave")
            assert engine.get_session(sid).position == len(PROMPT) + 3
            await refused(tokens_of(engine.generate(GenerateRequest(sid, max_tokens=4))), Reason.RUN_FAILED)
            await wait_until(lambda: not engine.get_session(sid).generating, "the second one to leave")
            assert engine.get_session(sid).position == len(PROMPT) + 3  # the bad id was drawn, never fed
            out = await engine.step(StepRequest(sid, tokens=[65], expected_position=len(PROMPT) + 3, output=LOGITS))
            got = logits_of(out)[-1]
            assert got.shape == (bad + 1,)
            want = torch_logits(ref, PROMPT + chain[:3] + [65])[-1]
            assert float(np.abs(got[:bad] - want).max()) < TOL

    run(scenario())
