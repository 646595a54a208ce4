"""The compute ceiling: the model driven by plain ONNX Runtime calls, no gRPC, no server.

``python -m seqserve.bench.raw_ort --bundle DIR --plan JSON`` runs each measurement in the plan and
prints one JSON object. The loops do what a batching server must do and nothing more:

  stream N    N sessions' rows live in a state pool [layers, capacity, hidden] at scattered slots;
              per iteration: gather their rows, one ``run`` with seq 1, scatter the new rows back.
  generate N  the same, feeding back the greedy (argmax) token of each row's logits.
  prefill L   one session, one ``run`` over an L-token prompt from the zero state.

With ``--device cuda`` the state stays on the GPU instead: all sessions step together and each
step's state outputs are bound (IO binding) as the next step's inputs, so only token ids go in and
only logits come out. That is the GPU's ceiling: no per-session gather or scatter at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from seqserve.bundle import load_bundle

from .stats import percentile

# float32 as the server runs it (TF32 off), with the CPU provider for the ops CUDA lacks
CUDA_PROVIDERS = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


def make_session(model: str | bytes, intra_op_threads: int, device: str = "cpu"):
    """An ORT session set up like the server's: fixed thread count, sequential execution.
    ``model``: a model file's path, or a serialized model."""
    import onnxruntime as ort

    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = CUDA_PROVIDERS if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(model, opts, providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDA execution provider did not start (running on {session.get_providers()[0]})")
    return session


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


class DeviceModel:
    """Sessions stepping together with their state kept on ``device`` (see the module docstring)."""

    def __init__(self, session, manifest, batch: int, device: str):
        import onnxruntime as ort

        self.session, self.manifest, self.device = session, manifest, device
        zeros = np.zeros(manifest.state_shape(batch), np.float32)
        self.zero_state = [ort.OrtValue.ortvalue_from_numpy(zeros, device, 0) for _ in manifest.state]
        self.state = self.zero_state

    def reset(self) -> None:
        """Back to the zero state (the zero values are only ever read, never written)."""
        self.state = self.zero_state

    def step(self, tokens: np.ndarray) -> np.ndarray:
        m = self.manifest
        binding = self.session.io_binding()
        binding.bind_cpu_input(m.input_name, tokens)
        for spec, value in zip(m.state, self.state):
            binding.bind_ortvalue_input(spec.input, value)
        binding.bind_output(m.logits_name, "cpu")
        for spec in m.state:
            binding.bind_output(spec.output, self.device)
        self.session.run_with_iobinding(binding)
        logits, *self.state = binding.get_outputs()
        return logits.numpy()


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
    return {
        "tokens_per_s": len(times) * tokens_per_call / elapsed,
        "calls": len(times),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
    }


def measure(session, manifest, item: dict, warmup_s: float, duration_s: float, device: str = "cpu") -> dict:
    """Run one plan item and return its summary."""
    vocab = manifest.input_dim
    if item["kind"] in ("stream", "generate"):
        n = item["batch"]
        model = PooledModel(session, manifest, n) if device == "cpu" else DeviceModel(session, manifest, n, device)
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
        if device != "cpu":
            model = DeviceModel(session, manifest, 1, device)

            def body():
                model.reset()
                model.step(prompt)

            times, elapsed = _timed_loop(body, warmup_s, duration_s)
            return _summary(times, elapsed, length)
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    session = make_session(str(bundle.model_path), args.intra_op_threads, args.device)
    results = []
    for item in json.loads(args.plan):
        results.append({**item, **measure(session, bundle.manifest, item, args.warmup, args.duration, args.device)})
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
