"""Per-call timings of the device runtime's parts, beside the raw loop's step.

``python -m seqserve.bench.runtime_timing --device cuda`` (the CUDA runtime's code also runs on
``--device cpu``) times, for each row count: one run of the step graph (gather, model and in-place
scatter together, what the server does per batch), the same as three separate runs, the gather and
the scatter alone, the plain model on dense state (a generation cohort's run) and the raw loop's
step (benchmark ceiling); then one session's prompt through the step graph and through the raw
loop. Medians of ``--calls`` calls, in ms; it also checks that the step graph and the three runs
give the same logits. Where the server's time on a GPU goes is read from these (docs/bench.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .model_choice import choose_model
from .raw_ort import DeviceModel, make_session


def _median_ms(call, calls: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4)


def three_runs(runtime, x: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """A batch the long way: a gather run, the model run, a scatter run (the step graph's parts)."""
    logits, state = runtime.run_dense(x, runtime.store.read(slots))
    runtime.store.write(slots, state)
    return logits


def measure(bundle, device: str, rows: list[int], calls: int, prompt: int) -> dict:
    from seqserve.server.runtime.device import DeviceRuntime

    m = bundle.manifest
    runtime = DeviceRuntime(bundle, device=device, initial_slots=max(rows) + 8)
    raw = make_session(str(bundle.model_path), 1, device)
    results: dict = {}
    for n in rows:
        slots = np.array([runtime.store.allocate() for _ in range(n)])
        x = (np.arange(n, dtype=np.int64) * 7 % m.input_dim).reshape(n, 1)
        dense = runtime.store.read(slots)
        loop = DeviceModel(raw, m, n, device)
        results[f"rows_{n}"] = {
            "step_graph_ms": _median_ms(lambda: runtime.run(x, slots), calls),
            "three_runs_ms": _median_ms(lambda: three_runs(runtime, x, slots), calls),
            "gather_ms": _median_ms(lambda: runtime.store.read(slots), calls),
            "scatter_ms": _median_ms(lambda: runtime.store.write(slots, dense), calls),
            "model_on_dense_state_ms": _median_ms(lambda: runtime.run_dense(x, dense), calls),
            "raw_loop_step_ms": _median_ms(lambda: loop.step(x), calls),
        }
        print(n, "rows:", results[f"rows_{n}"], flush=True)
        for slot in slots:
            runtime.store.release(int(slot))
    one = np.array([runtime.store.allocate()])
    tokens = (np.arange(prompt, dtype=np.int64) * 7 % m.input_dim).reshape(1, prompt)
    loop = DeviceModel(raw, m, 1, device)
    few = max(3, calls // 4)

    def raw_prompt() -> None:
        loop.reset()
        loop.step(tokens)

    results[f"prompt_{prompt}"] = {
        "step_graph_ms": _median_ms(lambda: runtime.run(tokens, one), few, 3),
        "raw_loop_ms": _median_ms(raw_prompt, few, 3),
    }
    print(f"{prompt}-token prompt:", results[f"prompt_{prompt}"], flush=True)
    results["step_graph_vs_three_runs_max_diff"] = _parity(bundle, runtime, device)
    return results


def _parity(bundle, runtime, device: str) -> float:
    """Largest logit difference between the step graph and the three-run path over a few batches."""
    from seqserve.server.runtime.device import DeviceRuntime

    other = DeviceRuntime(bundle, device=device, initial_slots=8)
    a = np.array([runtime.store.allocate() for _ in range(5)])
    b = np.array([other.store.allocate() for _ in range(5)])
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(5):
        x = rng.integers(0, bundle.manifest.input_dim, (5, 3)).astype(np.int64)
        worst = max(worst, float(np.abs(runtime.run(x, a) - three_runs(other, x, b)).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="per-call timings of the device runtime (see module docstring)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--model-dir", type=Path, help="models folder (default: models/, else a random 2x512 LSTM)")
    parser.add_argument("--model", help="model name in the models folder")
    parser.add_argument("--rows", default="1,16,256,1024", help="batch sizes (comma-separated)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per figure")
    parser.add_argument("--prompt", type=int, default=256, help="prompt length")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    with tempfile.TemporaryDirectory(prefix="seqserve-timing-") as scratch:
        chosen = choose_model(args.model_dir, args.model, args.tiny, Path(scratch))
        print(chosen.note, flush=True)
        results = measure(chosen.bundle, args.device, rows, args.calls, args.prompt)
    print(json.dumps(results), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
