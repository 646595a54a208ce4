"""Generation through the Engine (no gRPC): how it ends (length, stop sequence, cancel, the
session's close), what position and state it leaves, and that evictions and other sessions
around it never disturb it; batched (generation lanes) and naive."""

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
    torch_greedy,
    torch_logits,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(params=["on", "off"], ids=["batched", "naive"])
def batching(request) -> str:
    return request.param


async def tokens_of(agen) -> tuple[list[int], list]:
    chunks = [chunk async for chunk in agen]
    return [t for c in chunks for t in c.tokens], chunks


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


def test_a_large_cohort_runs_on_the_model_thread_and_each_row_stays_its_own(engine_models):
    """Eight generations queued at once feed their prompts in one run and join one lane together
    (eight generations or more: the lanes' runs go to the model thread); rows leave at different lengths and one
    is cancelled mid-flight. Every chain is still its own greedy chain, and everything comes back."""
    root, models = engine_models
    ref = models["lm-lstm"]
    prompts = [[(7 * i + j) % 251 + 1 for j in range(4)] for i in range(8)]  # one length: one prompt run
    lengths = [30 + 7 * i for i in range(8)]

    async def scenario():
        async with started(root, batching="on", max_generate_tokens=ENDLESS) as engine:
            model = engine.registry.get("lm-lstm")
            scheduler, store = engine.scheduler(model), model.runtime.store
            sids = [engine.create_session("lm-lstm").session_id for _ in prompts]
            sinks = [GenSink() for _ in prompts]
            items = [
                engine.submit_generate(GenerateRequest(sid, max_tokens=n, prompt=p, tokens_per_message=5), sink)
                for sid, n, p, sink in zip(sids, lengths, prompts, sinks)
            ]
            doomed = engine.create_session("lm-lstm").session_id
            doomed_sink = GenSink()
            doomed_item = engine.submit_generate(
                GenerateRequest(doomed, max_tokens=ENDLESS, prompt=PROMPT, tokens_per_message=1), doomed_sink
            )
            chains = await asyncio.gather(*(drain(sink) for sink in sinks[:4]))
            scheduler.cancel(doomed_item)  # mid-flight (it would never end on its own)
            chains += await asyncio.gather(*(drain(sink) for sink in sinks[4:]))
            assert sum(lane.thread_runs for lane in scheduler.lanes) > 0
            for i, chunks in enumerate(chains):
                assert [t for c in chunks for t in c.tokens] == torch_greedy(ref, prompts[i], lengths[i]), i
                assert chunks[-1].position == engine.get_session(sids[i]).position == 4 + lengths[i]
            await wait_until(lambda: scheduler.idle, "the cancelled generation to leave its lane")
            position = engine.get_session(doomed).position
            out = await engine.step(StepRequest(doomed, tokens=[65], output=LOGITS))
            assert_close_to_torch(out, ref, PROMPT + torch_greedy(ref, PROMPT, position - len(PROMPT)) + [65])
            assert all(not engine.get_session(s).generating for s in sids + [doomed])
            for sid in sids + [doomed]:
                engine.close_session(sid)
            assert store.in_use == 0
            assert all(item.joined for item in items)

    run(scenario())


def test_a_few_generations_share_one_lanes_runs(engine_models):
    """Generations too few for the model thread collect in one lane, where a run of three rows
    costs barely more than a run of one: they start one after another, yet every run feeds all
    three. Two are greedy, one is sampled with a seed; each chain is still its own (the greedy ones
    PyTorch's, the seeded one what it is alone)."""
    root, models = engine_models
    ref = models["lm-lstm"]
    sampling = Sampling(temperature=1.0, seed=7)
    prompts = [PROMPT, [66, 67], PROMPT]

    async def scenario():
        async with started(root, batching="on", max_generate_tokens=ENDLESS) as engine:
            scheduler = engine.scheduler(engine.registry.get("lm-lstm"))
            alone, _ = await tokens_of(
                engine.generate(
                    GenerateRequest(engine.create_session("lm-lstm").session_id, 200, PROMPT, sampling=sampling)
                )
            )
            sids = [engine.create_session("lm-lstm").session_id for _ in prompts]
            sinks = [GenSink() for _ in prompts]
            items = []
            for i, (sid, prompt, sink) in enumerate(zip(sids, prompts, sinks)):
                req = (
                    GenerateRequest(sid, 200, prompt, sampling=sampling)
                    if i == 2
                    else GenerateRequest(sid, ENDLESS, prompt)
                )
                items.append(engine.submit_generate(req, sink))
                await wait_until(lambda: engine.get_session(sid).position > len(prompt), f"generation {i} to start")
            assert sorted(len(lane) for lane in scheduler.lanes) == [0, 3]
            stats = scheduler.stats
            runs, rows = stats.runs, stats.rows
            await wait_until(lambda: stats.rows >= rows + 30, "ten more rounds")
            assert sorted(len(lane) for lane in scheduler.lanes) == [0, 3]  # the sampled one is not done yet
            assert stats.rows - rows == 3 * (stats.runs - runs)
            assert sum(lane.thread_runs for lane in scheduler.lanes) == 0  # too few for the model thread
            sampled = [t for c in await drain(sinks[2]) for t in c.tokens]
            assert sampled == alone
            for item in items[:2]:
                scheduler.cancel(item)
            await wait_until(lambda: scheduler.idle, "the greedy generations to leave their lane")
            for i in range(2):
                chain = [t for c in sinks[i].out for t in c.tokens]
                assert len(chain) >= 64 and chain == torch_greedy(ref, prompts[i], len(chain)), i

    run(scenario())


def test_a_lone_generation_on_the_event_loop_lets_other_sessions_step(engine_models):
    """A generation too small for the model thread feeds several tokens per turn of the event loop,
    but takes turns: another session's 30 steps are all answered, each equal to PyTorch's, while
    the endless generation is still running, and it stays greedy-exact throughout."""
    root, models = engine_models
    ref = models["lm-lstm"]

    async def scenario():
        async with started(root, batching="on", max_generate_tokens=ENDLESS) as engine:
            gen_sid = engine.create_session("lm-lstm").session_id
            step_sid = engine.create_session("lm-lstm").session_id
            sink = GenSink()
            item = engine.submit_generate(GenerateRequest(gen_sid, max_tokens=ENDLESS, prompt=PROMPT), sink)
            await wait_until(lambda: engine.get_session(gen_sid).position > len(PROMPT), "the generation to start")
            history: list[int] = []
            for i in range(30):
                history.append(30 + i)
                out = await engine.step(StepRequest(step_sid, tokens=[30 + i], output=LOGITS))
                assert out.position == len(history)
                assert not sink.done, "the generation ended before the other session's steps were answered"
            assert_close_to_torch(out, ref, history)
            await wait_until(lambda: len(sink.out) > 0, "a first message of the generation")
            engine.scheduler(item.session.model).cancel(item)
            await wait_until(lambda: not engine.get_session(gen_sid).generating, "the generation to stop")
            generated = [t for chunk in sink.out for t in chunk.tokens]
            assert len(generated) >= 64 and generated == torch_greedy(ref, PROMPT, len(generated))

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
