"""Generation lanes through the Engine (no gRPC): a large cohort on the model thread with every
row its own, a few generations sharing one lane's runs on the event loop, and a lone generation
there taking turns with other sessions' steps."""

from __future__ import annotations

import asyncio

import pytest

from seqserve.server.domain import GenerateRequest, Sampling, StepRequest
from seqserve.server.work import GenSink
from tests.engine_support import (
    ENDLESS,
    LOGITS,
    PROMPT,
    assert_close_to_torch,
    drain,  # noqa: F401
    run,
    started,
    tokens_of,
    torch_greedy,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


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
