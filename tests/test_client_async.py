"""Every AsyncClient call against a real server, checked against the blocking client's answers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from seqserve.client import (AsyncClient, AsyncSession, Client, ModelNotFound, PositionMismatch, Sampling,
                             SessionNotFound, decode_tokens)
from tests.client_support import shared_server


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


def _sync_reference(target: str) -> dict:
    """The same calls through the blocking client (a deterministic baseline)."""
    with Client(target) as c:
        with c.session("lm-lstm") as s:
            step = s.step("async", logits=True, all_positions=True)
            feed = s.feed(" io", argmax=True)
            gen = s.generate(" and ", max_tokens=20, top_k=30, seed=5)
            text = "".join(gen)
        with c.session("feat-gru") as s:
            frames = np.linspace(-1, 1, 5 * 8, dtype=np.float32).reshape(5, 8)
            cls = s.classify(frames)
        return {"step": step, "feed": feed, "text": text, "tokens": gen.tokens, "cls": cls, "frames": frames,
                "models": c.models()}


async def _scenario(target: str, ref: dict) -> None:
    async with AsyncClient(target, timeout=20) as c:
        assert await c.models() == ref["models"]
        assert (await c.model("lm-gru")).cell == "gru"
        with pytest.raises(ModelNotFound):
            await c.model("nope")

        async with c.session("lm-lstm") as s:
            assert isinstance(s, AsyncSession) and s.position == 0
            step = await s.step("async", logits=True, all_positions=True)
            np.testing.assert_allclose(step.logits, ref["step"].logits, atol=1e-6)
            feed = await s.feed(" io", argmax=True)
            np.testing.assert_array_equal(feed.argmax, ref["feed"].argmax)
            gen = s.generate(" and ", max_tokens=20, top_k=30, seed=5)
            pieces = [piece async for piece in gen]
            assert "".join(pieces) == ref["text"] == gen.text == decode_tokens(gen.tokens)
            assert gen.tokens == ref["tokens"] and gen.finish_reason == "length"
            assert s.position == 5 + 3 + 5 + 20 == (await s.info()).position
            chunks = [c_ async for c_ in s.generate_tokens(max_tokens=5, temperature=0.0)]
            assert sum(len(ch.tokens) for ch in chunks) == 5 and chunks[-1].finish_reason == "length"
            assert await s.feed("zz", none=True) is None and s.position == 40
            info = await s.reset()
            assert info.position == 0 == s.position
            sid = s.id
        with pytest.raises(SessionNotFound):
            await c.get_session(sid)

        s = await c.session("feat-gru", session_id="async-feat")
        cls = await s.classify(ref["frames"])
        np.testing.assert_allclose(cls.probs, ref["cls"].probs, atol=1e-6)
        assert cls.label == ref["cls"].label
        attached = await c.attach("async-feat")
        assert attached.position == 5 and (await c.get_session("async-feat")).position == 5
        await attached.step(ref["frames"][:1])
        with pytest.raises(PositionMismatch):
            await s.step(ref["frames"][1:2])  # different input: not a resend of the applied step
        await s.info()
        assert s.position == 6
        assert await c.close_session("async-feat") == 6
        assert await s.close() == 6  # already gone: not an error

        # Abandoning a generation midway: the next call re-reads the position.
        async with c.session("lm-gru") as s:
            await s.feed("hi", none=True)
            async for _piece in s.generate(max_tokens=300, seed=1):
                break
            r = await s.step("!")
            assert r.position == s.position == (await s.info()).position

        # The session closes on exit when the block raises, too.
        with pytest.raises(RuntimeError):
            async with c.session("lm-rnn") as s:
                sid = s.id
                raise RuntimeError("boom")
        with pytest.raises(SessionNotFound):
            await c.get_session(sid)

        # Sampling through a plain step, same seed, same draw.
        draws = []
        for _ in range(2):
            async with c.session("lm-rnn") as s:
                draws.append(int((await s.step("q", sample=Sampling(seed=9))).sampled[0]))
        assert draws[0] == draws[1]


def test_async_client_matches_sync(server):
    ref = _sync_reference(server.target)
    asyncio.run(_scenario(server.target, ref))
