"""A model run's answers (domain.StepAnswers) reach the right sinks: each stream sharing a run
gets its own rows, in order, with its own sessions' values."""

from __future__ import annotations

import numpy as np
import pytest

from seqserve.server.domain import OutputSpec, StepRequest
from tests.engine_support import TOL, Collect, logits_of, run, started, torch_logits

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def test_each_sink_gets_its_own_rows_of_a_shared_run(engine_models):
    """Steps of three streams (sinks) interleaved in one run: each sink gets exactly its steps'
    answers, in its order, each with its own session's values (PyTorch's), for the default outputs
    and for several outputs at once."""
    root, models = engine_models
    rng = np.random.default_rng(12)
    n = 12
    tokens = rng.integers(0, 64, n).tolist()
    expected = [torch_logits(models["lm-gru"], [t])[-1] for t in tokens]

    async def scenario(output):
        async with started(root, max_wait_ms=50.0) as engine:
            sids = [engine.create_session("lm-gru").session_id for _ in range(n)]
            sinks = [Collect() for _ in range(3)]
            for i, sid in enumerate(sids):
                engine.submit_stream_steps([StepRequest(sid, [tokens[i]], output=output, tag=i)], sinks[i % 3])
            got = [await sink.wait(n // 3) for sink in sinks]
            return got, engine.scheduler(engine.registry.get("lm-gru")).stats.runs

    for output in (None, OutputSpec(logits=True, argmax=True, top_k=3)):
        got, runs = run(scenario(output))
        assert runs == 1, "the twelve steps were meant to share one run"
        for j, answers in enumerate(got):
            assert [a.tag for a in answers] == list(range(j, n, 3)), f"sink {j}"
            for a in answers:
                i = a.tag
                want = expected[i]
                assert a.session_id and a.position == 1
                top = np.argsort(want)[::-1][: len(a.values["top_k_ids"])]
                assert a.values["top_k_ids"] == top.tolist(), (output, i)
                if output is not None:
                    np.testing.assert_allclose(logits_of(a)[0], want, atol=TOL)
                    assert a.values["argmax"] == [int(np.argmax(want))]
