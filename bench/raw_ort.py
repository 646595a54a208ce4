"""The compute ceiling: the model driven by plain ONNX Runtime calls, no gRPC, no server.

``python -m seqserve.bench.raw_ort --bundle DIR --plan JSON`` runs each measurement in the plan and
prints one JSON object. The loops do what a batching server must do and nothing more:

  stream N    N sessions' rows live in a state pool [layers, capacity, hidden] at scattered slots;
              per iteration: gather their rows, one ``run`` with seq 1, scatter the new rows back.
  generate N  the same, feeding back the greedy (argmax) token of each row's logits.
  prefill L   one session, one ``run`` over an L-token prompt from the zero state.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from seqserve.bundle import load_bundle

from .stats import percentile


def make_session(model_path: str, intra_op_threads: int):
    """An ORT CPU session set up like the server's: fixed thread count, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


class PooledModel:
    """A state pool plus the gather / run / scatter step a server performs per batch."""

    def __init__(self, session, manifest, batch: int, seed: int = 0):
        self.session = session
        self.manifest = manifest
        rng = np.random.default_rng(seed)
        capacity = max(2 * batch, 8)
        self.slots = np.sort(rng.choice(capacity, size=batch, replace=False))
        self.pools = [np.zeros(manifest.state_shape(capacity), np.float32) for _ in manifest.state]
        self.state_in = [s.input for s in manifest.state]
        self.fetch = [manifest.logits_name] + [s.output for s in manifest.state]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One step for every session; ``tokens`` is int64 [batch, seq]. Returns the logits."""
        feed = {self.manifest.input_name: tokens}
        for name, pool in zip(self.state_in, self.pools):
            feed[name] = pool[:, self.slots, :]
        logits, *new_state = self.session.run(self.fetch, feed)
        for pool, rows in zip(self.pools, new_state):
            pool[:, self.slots, :] = rows
        return logits


def _timed_loop(body, warmup_s: float, duration_s: float) -> tuple[list[float], float]:
    """Run ``body`` through warm-up, then record each call's seconds until the window ends."""
    t_end_warm = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end_warm:
        body()
    times: list[float] = []
    t0 = time.perf_counter()
    end = t0 + duration_s
    now = t0
    while now < end:
        body()
        later = time.perf_counter()
        times.append(later - now)
        now = later
    return times, now - t0


def _summary(times: list[float], elapsed: float, tokens_per_call: int) -> dict:
    ms = [t * 1e3 for t in times]
    return {"tokens_per_s": len(times) * tokens_per_call / elapsed, "calls": len(times),
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}


def measure(session, manifest, item: dict, warmup_s: float, duration_s: float) -> dict:
    """Run one plan item and return its summary."""
    vocab = manifest.input_dim
    if item["kind"] in ("stream", "generate"):
        n = item["batch"]
        model = PooledModel(session, manifest, n)
        tokens = (np.arange(n, dtype=np.int64) * 31 + 1).reshape(n, 1) % vocab
        if item["kind"] == "stream":
            def body():
                model.step(tokens)
                tokens[:] = (tokens + 7) % vocab
        else:
            def body():
                logits = model.step(tokens)
                tokens[:, 0] = np.argmax(logits[:, -1, :], axis=-1)
        times, elapsed = _timed_loop(body, warmup_s, duration_s)
        return _summary(times, elapsed, n)
    if item["kind"] == "prefill":
        length = item["tokens"]
        prompt = (np.arange(length, dtype=np.int64) * 7 + 3).reshape(1, length) % vocab
        zeros = {s.input: np.zeros(manifest.state_shape(1), np.float32) for s in manifest.state}
        feed = {manifest.input_name: prompt, **zeros}
        fetch = [manifest.logits_name] + [s.output for s in manifest.state]
        times, elapsed = _timed_loop(lambda: session.run(fetch, feed), warmup_s, duration_s)
        return _summary(times, elapsed, length)
    raise ValueError(f"unknown raw measurement {item['kind']!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="raw ONNX Runtime loops (compute ceiling)")
    parser.add_argument("--bundle", required=True, help="bundle folder (holds model.onnx and manifest.json)")
    parser.add_argument("--plan", required=True, help='JSON list of {"kind": ..., "batch"|"tokens": ...}')
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    session = make_session(str(bundle.model_path), args.intra_op_threads)
    results = []
    for item in json.loads(args.plan):
        results.append({**item, **measure(session, bundle.manifest, item, args.warmup, args.duration)})
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
