"""What only the asyncio flavour has: awaiting or entering ``client.session()``, and tasks sharing a client.

Every other public method runs in both flavours in test_client_sdk.py, test_client_errors.py,
test_client_stream.py and test_client_retry.py.
"""

from __future__ import annotations

import asyncio

import pytest

from seqserve.client import AsyncClient, AsyncSession, SessionNotFound, SessionOpener
from tests.client_support import shared_server


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


async def _opener_forms(target: str) -> None:
    async with AsyncClient(target, timeout=20) as c:
        opener = c.session("lm-gru")
        assert isinstance(opener, SessionOpener)
        s = await opener  # awaited: the caller closes it
        assert isinstance(s, AsyncSession) and s.position == 0
        await s.step("ab")
        assert await s.close() == 2

        async with c.session("lm-gru") as s:  # entered: closed on exit
            sid = s.id
            await s.feed("abc", none=True)
        with pytest.raises(SessionNotFound):
            await c.get_session(sid)

        with pytest.raises(RuntimeError, match="boom"):
            async with c.session("lm-rnn") as s:
                sid = s.id
                raise RuntimeError("boom")
        with pytest.raises(SessionNotFound):  # closed on the way out of the failing block too
            await c.get_session(sid)


def test_session_opener_awaited_or_entered(server):
    asyncio.run(_opener_forms(server.target))


async def _tasks_share_one_client(target: str) -> list[list[int]]:
    async with AsyncClient(target, timeout=30) as c:

        async def run(seed: int) -> list[int]:
            async with c.session("lm-lstm") as s:
                gen = s.generate("hi", max_tokens=12, seed=seed)
                async for _ in gen:
                    pass
                return gen.tokens

        return await asyncio.gather(*(run(seed) for seed in (1, 2, 1, 2)))


def test_concurrent_tasks_on_one_client(server):
    runs = asyncio.run(_tasks_share_one_client(server.target))
    assert runs[0] == runs[2] and runs[1] == runs[3] and all(len(r) == 12 for r in runs)
