"""The whole server on the CUDA execution provider, against PyTorch.

These run only where onnxruntime has the CUDA provider (onnxruntime-gpu on a machine with a GPU);
elsewhere they skip. The CUDA runtime's own code (device slabs, gather/run/scatter, dense runs) is
also checked on the CPU provider in every run, in test_server_device_state.py.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime
import pytest

from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from tests.test_server_generate import torch_greedy
from tests.test_server_parity import TOL, reference, rows_of, session_plans, step_request

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in onnxruntime.get_available_providers(), reason="needs onnxruntime-gpu and a GPU"
    ),
]


@pytest.fixture(scope="module")
def cuda_server(tiny_models):
    models_dir, _ = tiny_models
    with ServerThread(
        ServerConfig(models=str(models_dir), port=0, metrics_port=0, device="cuda", max_wait_ms=1.0)
    ) as srv:
        yield srv


def test_every_model_runs_on_the_gpu(cuda_server):
    providers = cuda_server.call(
        lambda: {
            m.key: (m.runtime.provider, m.runtime.session.get_providers()[0]) for m in cuda_server.engine.registry.all()
        }
    )
    assert providers and all(p == ("CUDAExecutionProvider",) * 2 for p in providers.values()), providers


def test_pipelined_sessions_on_the_gpu_match_pytorch(cuda_server, tiny_models):
    """Thirty sessions of every model, stepped token by token or in chunks on one pipelined stream,
    so their steps share GPU runs: every position's logits are one whole-sequence PyTorch run's."""
    _, torch_models = tiny_models
    plans = session_plans(torch_models, 30, np.random.default_rng(3), (6, 30), ("tokens", "random"))

    async def run() -> dict[str, list]:
        async with grpc.aio.insecure_channel(cuda_server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            for p in plans:
                p["sid"] = (await stub.CreateSession(pb.CreateSessionRequest(model=p["name"]))).session_id
            got: dict[str, list] = {p["sid"]: [] for p in plans}
            call = stub.StepStream()
            queue = sorted(((k, j) for j, p in enumerate(plans) for k in range(len(p["pieces"]))))
            for k, j in queue:  # interleaved: the k-th piece of every session before any (k+1)-th
                await call.write(step_request(plans[j]["sid"], plans[j]["pieces"][k], tag=k))
            await call.done_writing()
            while (result := await call.read()) != grpc.aio.EOF:
                got[result.session_id].append((result.tag, rows_of(result)))
            return got

    def stats():
        schedulers = {m.key: cuda_server.engine.scheduler(m) for m in cuda_server.engine.registry.all()}
        return {key: (s.stats.runs, s.stats.rows) for key, s in schedulers.items()}

    before = cuda_server.call(stats)
    got = asyncio.run(run())
    after = cuda_server.call(stats)
    for p in plans:
        tags = [tag for tag, _ in got[p["sid"]]]
        assert tags == list(range(len(p["pieces"])))
        logits = np.concatenate([rows for _, rows in got[p["sid"]]])
        diff = float(np.abs(logits - reference(torch_models[p["name"]], p["x"])).max())
        assert diff < TOL, f"{p['name']}: max diff {diff}"
    assert any(after[k][1] - before[k][1] > after[k][0] - before[k][0] for k in after), "no run was shared"


def test_concurrent_greedy_generations_on_the_gpu_match_pytorch(cuda_server, tiny_models):
    _, models = tiny_models
    prompts = [[(11 * i + j) % 251 + 1 for j in range(1 + i % 4)] for i in range(16)]
    names = ["lm-lstm" if i % 2 else "lm-gru" for i in range(16)]

    async def run() -> list[list[int]]:
        async with grpc.aio.insecure_channel(cuda_server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)

            async def one(i: int) -> list[int]:
                sid = (await stub.CreateSession(pb.CreateSessionRequest(model=names[i]))).session_id
                call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt=prompts[i], max_tokens=30))
                return [t async for m in call for t in m.tokens]

            return await asyncio.gather(*(one(i) for i in range(16)))

    for i, chain in enumerate(asyncio.run(run())):
        assert chain == torch_greedy(models[names[i]], prompts[i], 30), f"generation {i} ({names[i]})"
