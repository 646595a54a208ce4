"""The benchmark harness: a quick end-to-end run, the raw ORT loop's bookkeeping, the verdicts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from seqserve.bench.config import BenchConfig
from seqserve.bench.memory import MemoryResult
from seqserve.bench.report import evaluate
from seqserve.bench.runner import Measurement


@pytest.mark.timeout(120)
def test_quick_bench_runs_every_system_and_writes_results(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "seqserve", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny random-weight LSTM" in proc.stdout  # says which model it measured
    assert "Targets" in proc.stdout and ("PASS" in proc.stdout or "FAIL" in proc.stdout)

    [json_path] = out.glob("bench-*.json")
    record = json.loads(json_path.read_text())
    cfg = BenchConfig.quick_config()
    got = {(m["target"], m["workload"]) for m in record["measurements"]}
    for n in cfg.stream_sessions:
        assert {(t, f"stream-{n}") for t in ("server", "naive", "echo", "raw")} <= got
    assert {w for t, w in got if w.startswith("kserve")} == {f"kserve-stream-{n}" for n in cfg.kserve_sessions}
    assert all(t == "server" for t, w in got if w.startswith("kserve"))  # the KServe API is the server's
    sdk = {f"packed-{n}" for n in cfg.packed_sessions} | {f"sdk-stream-{n}" for n in cfg.packed_sessions}
    assert {w for t, w in got if w.split("-")[0] in ("packed", "sdk")} == sdk
    assert (
        all(t == "server" for t, w in got if w in sdk) and {("raw", f"stream-{n}") for n in cfg.packed_sessions} <= got
    )
    # each target's baselines also run right after the server's workload it judges (the packed
    # workload's raw loop steps as many rows: stream-N)
    big, [packed], prefill = f"stream-{max(cfg.stream_sessions)}", cfg.packed_sessions, f"prefill-{cfg.prefill_tokens}"
    beside = {("echo-beside", big), ("naive-beside", big), ("metrics-beside", big), ("raw-beside", f"stream-{packed}")}
    beside |= {("raw-beside", f"generate-{max(cfg.generate_sessions)}"), ("raw-beside", prefill)}
    beside |= {("raw-beside", "generate-1"), ("naive-beside", "generate-1")}
    assert {(t, w) for t, w in got if t.endswith("-beside")} == beside
    for n in cfg.generate_sessions:
        assert {("server", f"generate-{n}"), ("naive", f"generate-{n}"), ("raw", f"generate-{n}")} <= got
    assert ("server", f"prefill-{cfg.prefill_tokens}") in got and ("raw", f"prefill-{cfg.prefill_tokens}") in got
    # the inline floor measures one session streaming, nothing else; metrics on, the biggest stream,
    # right after the server's (no block of its own: that would be its only workload)
    assert {w for t, w in got if t == "floor"} == {f"stream-{min(cfg.stream_sessions)}"}
    [scraped] = [m for m in record["measurements"] if m["target"].startswith("metrics")]
    assert scraped["target"] == "metrics-beside" and scraped["workload"] == big and scraped["extra"]["scrapes"] >= 1
    # the long prompt's own feed rate is recorded beside the streaming sessions it shares the server with
    [longprompt] = [m for m in record["measurements"] if m["workload"].startswith("longprompt")]
    assert longprompt["extra"]["side_tok_s"] > 0, longprompt
    for m in record["measurements"]:
        assert m["tokens_per_s"] > 0, m
        assert m["extra"].get("errors", 0) == 0, m
        assert 0 < m["p50_ms"] <= m["p99_ms"], m

    # the echo answers with replies of the server's size, so it is a fair transport ceiling
    replies = {
        (m["target"], m["workload"]): m["extra"]["reply_bytes"]
        for m in record["measurements"]
        if m["target"] in ("server", "echo")
    }
    workload = f"stream-{cfg.stream_sessions[-1]}"
    assert replies[("echo", workload)] == pytest.approx(replies[("server", workload)], abs=2)

    [memory] = record["memory"]
    assert memory["sessions"] == cfg.idle_sessions and memory["rss_created"] > 0
    assert all(v["passed"] is not None for v in record["targets"] if not v["informational"]), record["targets"]
    assert all(v["measured"] is not None for v in record["targets"]), record["targets"]
    assert (out / json_path.name.replace(".json", ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(90)
def test_inline_floor_answers_with_the_served_models_top_k(tiny_models):
    """The floor runs the real model: step for step, its top-k equals the server's for the same tokens."""
    import grpc

    from seqserve.bench.procs import ServingProcess
    from seqserve.bundle import discover
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig
    from seqserve.v1 import seqserve_pb2 as pb
    from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

    root, _ = tiny_models
    floor = ServingProcess(
        [sys.executable, "-m", "seqserve.bench.echo", "--port", "0", "--bundle", str(discover(root)["lm-lstm"][1])],
        "floor",
        start_timeout_s=60,
    )
    steps = [[72], [105], [33, 10, 200], [7]]
    answers = {}
    try:
        with ServerThread(ServerConfig(models=str(root), port=0, metrics_port=0, device="cpu")) as srv:
            for name, address in (("floor", floor.address), ("server", srv.address)):
                with grpc.insecure_channel(address) as channel:
                    stub = pb_grpc.SeqServeStub(channel)
                    sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm"), timeout=10).session_id
                    requests = [
                        pb.StepRequest(session_id=sid, tokens=t, output=pb.OutputSpec(top_k=4), tag=i)
                        for i, t in enumerate(steps)
                    ]
                    answers[name] = list(stub.StepStream(iter(requests), timeout=20))
    finally:
        floor.stop()
    for got, want in zip(answers["floor"], answers["server"], strict=True):
        assert (got.tag, got.position, got.width) == (want.tag, want.position, want.width)
        assert list(got.top_k_ids) == list(want.top_k_ids)
        np.testing.assert_allclose(got.top_k_logprobs, want.top_k_logprobs, atol=1e-5)


def test_pooled_raw_loop_matches_one_session_at_a_time(tiny_models):
    from seqserve.bench.raw_ort import PooledModel, make_session
    from seqserve.bundle import discover, load_bundle

    root, _ = tiny_models
    bundle = load_bundle(discover(root)["lm-lstm"][1])
    session = make_session(str(bundle.model_path), 1)
    pooled = PooledModel(session, bundle.manifest, batch=3)
    tokens = np.array([[5], [9], [200]], dtype=np.int64)
    for _ in range(2):
        batch_logits = pooled.step(tokens)
    # the same two steps, one session at a time from the zero state
    m = bundle.manifest
    fetch = [m.logits_name] + [s.output for s in m.state]
    for row in range(3):
        state = {s.input: np.zeros(m.state_shape(1), np.float32) for s in m.state}
        for _ in range(2):
            logits, *new = session.run(fetch, {m.input_name: tokens[row : row + 1], **state})
            state = {s.input: v for s, v in zip(m.state, new)}
        np.testing.assert_allclose(batch_logits[row], logits[0], atol=1e-5)
        for s, pool in zip(m.state, pooled.pools):
            np.testing.assert_allclose(pool[:, pooled.slots[row], :], state[s.input][:, 0, :], atol=1e-5)


def test_device_raw_loop_matches_the_pooled_loop(tiny_models):
    """The GPU ceiling's loop (state kept as device values, outputs bound as the next inputs), run on
    the CPU device: same logits as the pooled host loop, step after step, and reset starts over."""
    from seqserve.bench.raw_ort import DeviceModel, PooledModel, make_session
    from seqserve.bundle import discover, load_bundle

    root, _ = tiny_models
    bundle = load_bundle(discover(root)["lm-gru"][1])
    session = make_session(str(bundle.model_path), 1)
    pooled, device = PooledModel(session, bundle.manifest, batch=4), DeviceModel(session, bundle.manifest, 4, "cpu")
    tokens = np.array([[5], [9], [200], [17]], dtype=np.int64)
    first = None
    for step in range(3):
        expected, got = pooled.step(tokens), device.step(tokens)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        first = got if step == 0 else first
        tokens = (tokens * 3 + 1) % 256
    device.reset()
    np.testing.assert_allclose(device.step(np.array([[5], [9], [200], [17]], dtype=np.int64)), first, atol=1e-6)
    assert not np.allclose(device.step(np.array([[5], [9], [200], [17]], dtype=np.int64)), first, atol=1e-3)


def test_cuda_bench_leaves_out_the_host_memory_measurement():
    with pytest.raises(ValueError, match="memory"):
        BenchConfig(device="cuda").validate()
    BenchConfig(device="cuda", targets=("server", "naive", "echo", "raw")).validate()
    with pytest.raises(ValueError, match="--device"):
        BenchConfig(device="tpu").validate()


def test_bench_device_flag_reaches_every_served_system_and_the_raw_loop():
    import argparse

    from seqserve.bench.cli import _config, add_arguments
    from seqserve.bench.model_choice import ChosenModel
    from seqserve.bench.runner import Runner

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = _config(parser.parse_args(["--device", "cuda"]))
    assert cfg.device == "cuda" and "memory" not in cfg.targets and "raw" in cfg.targets
    assert _config(parser.parse_args([])).device == "cpu"
    runner = Runner(cfg, ChosenModel(bundle=None, serve_root="models", note=""), print, "out")
    argv = runner._server_argv(batching=False)
    assert argv[argv.index("--device") + 1] == "cuda" and "--batching" in argv


def test_runtime_timing_runs_every_part_and_finds_the_step_graph_exact(tmp_path):
    from seqserve.bench.runtime_timing import main

    out = tmp_path / "timing.json"
    assert main(["--device", "cpu", "--tiny", "--rows", "1,4", "--calls", "3", "--prompt", "8", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    for n in (1, 4):
        assert set(figures[f"rows_{n}"]) == {
            "step_graph_ms",
            "three_runs_ms",
            "gather_ms",
            "scatter_ms",
            "model_on_dense_state_ms",
            "raw_loop_step_ms",
        }
        assert all(v > 0 for v in figures[f"rows_{n}"].values())
    assert figures["prompt_8"]["step_graph_ms"] > 0
    assert figures["step_graph_vs_three_runs_max_diff"] == 0.0


def _m(target, workload, tps, p50, repeat=0):
    return Measurement(target, workload, repeat, tps, p50, p50 * 2)


def test_verdicts_compare_within_each_repeat():
    cfg = BenchConfig(
        stream_sessions=[1, 256],
        generate_sessions=[256],
        prefill_tokens=256,
        packed_sessions=[256],
        long_prompt_sessions=256,
    )
    ms = []
    for r, scale in enumerate([1.0, 0.5, 0.9]):  # the machine slows down in repeat 1: ratios hold
        ms += [
            _m("server", "stream-256", 8000 * scale, 30, r),
            _m("metrics", "stream-256", 7900 * scale, 30, r),
            _m("server", "kserve-stream-256", 6000 * scale, 40, r),
            _m("naive", "stream-256", 2500 * scale, 90, r),
            _m("echo", "stream-256", 12000 * scale, 20, r),
            _m("server", "generate-256", 24000 * scale, 10, r),
            _m("raw", "generate-256", 27000 * scale, 9, r),
            _m("server", "stream-1", 3000, 0.50, r),
            _m("raw", "stream-1", 5000, 0.18, r),
            _m("echo", "stream-1", 4500, 0.21, r),
            _m("floor", "stream-1", 2200, 0.45, r),
            _m("server", "prefill-256", 9000, 30.0, r),
            _m("raw", "prefill-256", 9100, 28.0, r),
            _m("raw", "stream-256", 20000 * scale, 12.0, r),
            _m("server", "packed-256", 15000 * scale, 17.0, r),
            _m("server", "sdk-stream-256", 3000 * scale, 80.0, r),
            _m("server", "longprompt-256", 7000 * scale, 45.0, r),
        ]
    memory = [
        MemoryResult(
            0,
            1000,
            8192,
            rss_before=100 << 20,
            rss_created=(100 << 20) + 1000 * 8192 * 2,
            rss_touched=(100 << 20) + 1000 * 9000,
            create_s=1.0,
            touch_s=1.0,
        )
    ]
    verdicts = evaluate(cfg, ms, memory)
    (
        naive,
        echo,
        gen,
        metrics,
        latency,
        floor_cost,
        over_floor,
        prefill,
        kserve,
        long,
        long_tput,
        packed,
        gain,
        created,
        touched,
    ) = verdicts
    assert "naive" in naive.name and naive.measured == pytest.approx(3.2) and naive.passed is False
    assert "echo" in echo.name and echo.measured == pytest.approx(8000 / 12000) and echo.passed is False
    assert gen.measured == pytest.approx(24 / 27) and gen.passed is True
    assert "metrics" in metrics.name and metrics.measured == pytest.approx(7900 / 8000) and metrics.passed is True
    assert latency.measured == pytest.approx(0.11) and latency.passed is True
    assert floor_cost.measured == pytest.approx(0.06) and floor_cost.passed is None and floor_cost.informational
    assert over_floor.measured == pytest.approx(0.05) and over_floor.passed is True
    assert prefill.measured == pytest.approx(28 / 30) and prefill.passed is True
    assert "KServe" in kserve.name and kserve.measured == pytest.approx(0.75) and kserve.passed is True
    assert "prompts" in long.name and long.measured == pytest.approx(45 / 30) and long.passed is True
    assert long_tput.measured == pytest.approx(7000 / 8000) and long_tput.informational and long_tput.passed is None
    assert "packed" in packed.name and packed.measured == pytest.approx(0.75) and packed.passed is True
    assert gain.measured == pytest.approx(5.0) and gain.informational and gain.passed is None
    assert created.measured == pytest.approx(2.0) and created.passed is False
    assert touched.measured == pytest.approx(9000 / 8192) and touched.passed is True


def test_missing_measurements_give_no_verdict():
    verdicts = evaluate(BenchConfig(), [_m("server", "stream-256", 8000, 30)], [])
    assert all(v.passed is None and math.isnan(v.measured) for v in verdicts)


def test_one_generating_session_is_compared_with_raw_and_naive():
    """generate-1 has its own two targets when 1 is among the generating session counts."""
    cfg = BenchConfig(generate_sessions=[1, 256])
    ms = []
    for r, scale in enumerate([1.0, 0.6, 0.9]):
        ms += [
            _m("server", "generate-1", 5000 * scale, 0.2, r),
            _m("raw", "generate-1", 6000 * scale, 0.16, r),
            _m("naive", "generate-1", 4800 * scale, 0.21, r),
        ]
    by_name = {v.name: v for v in evaluate(cfg, ms, [])}
    vs_raw = by_name["generation, 1 session vs raw ORT loop"]
    vs_naive = by_name["generation, 1 session vs naive server"]
    assert vs_raw.measured == pytest.approx(5 / 6) and vs_raw.passed is False
    assert vs_naive.measured == pytest.approx(5 / 4.8) and vs_naive.passed is True
    alone = {v.name for v in evaluate(BenchConfig(generate_sessions=[1]), ms, [])}  # then it is the main one
    assert "generation, 1 sessions vs raw ORT loop" in alone and "generation, 1 session vs naive server" not in alone


def test_ratios_prefer_the_baseline_run_right_after_the_server():
    """Where a target's baseline ran right after the server's workload ("<system>-beside"), the
    target uses that run, not the baseline's block minutes away; without it, the block."""
    cfg = BenchConfig(stream_sessions=[1, 256], generate_sessions=[1, 256], packed_sessions=[256], prefill_tokens=256)
    ms = [
        _m("server", "stream-256", 8000, 30.0),
        _m("naive", "stream-256", 4000, 60.0),
        _m("echo", "stream-256", 16000, 15.0),
        _m("metrics", "stream-256", 4000, 60.0),
        _m("server", "generate-256", 20000, 10.0),
        _m("raw", "generate-256", 40000, 5.0),
        _m("server", "generate-1", 5000, 0.2),
        _m("raw", "generate-1", 8000, 0.12),
        _m("naive", "generate-1", 10000, 0.1),
        _m("server", "packed-256", 14000, 15.0),
        _m("raw", "stream-256", 28000, 9.0),
        _m("server", "prefill-256", 5000, 20.0),
        _m("raw", "prefill-256", 10000, 10.0),
    ]
    # target: (its ratio from the blocks, its ratio from the runs right after the server)
    expected = {
        "streaming, 256 sessions vs naive server": (2.0, 4.0),
        "streaming, 256 sessions vs gRPC echo": (0.5, 0.8),
        "streaming, 256 sessions, metrics on and scraped every second vs off": (0.5, 7900 / 8000),
        "generation, 256 sessions vs raw ORT loop": (0.5, 20 / 22),
        "generation, 1 session vs raw ORT loop": (5000 / 8000, 5000 / 5500),
        "generation, 1 session vs naive server": (0.5, 5000 / 4800),
        "packed: 256 sessions through one SDK stream vs raw ORT loop at 256 rows": (0.5, 0.7),
        "prefill of 256 tokens vs raw ORT": (0.5, 18 / 20),
    }
    blocks = {v.name: v for v in evaluate(cfg, ms, [])}
    for name, (value, _) in expected.items():
        assert blocks[name].measured == pytest.approx(value) and "right after" not in blocks[name].detail, name
    ms += [
        _m("naive-beside", "stream-256", 2000, 120.0),
        _m("echo-beside", "stream-256", 10000, 24.0),
        _m("metrics-beside", "stream-256", 7900, 30.0),
        _m("raw-beside", "generate-256", 22000, 9.0),
        _m("raw-beside", "generate-1", 5500, 0.18),
        _m("naive-beside", "generate-1", 4800, 0.21),
        _m("raw-beside", "stream-256", 20000, 12.0),
        _m("raw-beside", "prefill-256", 5000, 18.0),
    ]
    beside = {v.name: v for v in evaluate(cfg, ms, [])}
    for name, (_, value) in expected.items():
        v = beside[name]
        assert v.measured == pytest.approx(value) and v.passed is True and "right after" in v.detail, name


def test_baselines_run_beside_the_server_only_where_a_target_compares_them():
    """The beside plan pairs each judged server workload with the baselines among the targets;
    metrics, whose only workload is then measured beside, gets no block of its own."""
    cfg = BenchConfig(stream_sessions=[1, 64], generate_sessions=[1, 16], packed_sessions=[32], prefill_tokens=128)
    assert cfg.beside_plan() == {
        "stream-64": ["echo", "naive", "metrics"],
        "packed-32": ["raw"],
        "generate-16": ["raw"],
        "generate-1": ["raw", "naive"],
        "prefill-128": ["raw"],
    }
    assert cfg.blocks() == ["server", "naive", "echo", "floor", "raw"]
    some = cfg.with_overrides(targets=("server", "metrics", "raw"), generate_sessions=[16])
    assert some.beside_plan() == {
        "stream-64": ["metrics"],
        "packed-32": ["raw"],
        "generate-16": ["raw"],
        "prefill-128": ["raw"],
    }
    assert some.blocks() == ["server", "raw"]
    alone = cfg.with_overrides(targets=("metrics", "naive"))  # nothing to compare beside: blocks as before
    assert alone.beside_plan() == {} and alone.blocks() == ["metrics", "naive"]
    one = cfg.with_overrides(generate_sessions=[1])  # then generation's one target is against raw alone
    assert one.beside_plan()["generate-1"] == ["raw"]
