"""The device-resident runtime (the CUDA path's code) checked on the CPU execution provider.

Its gather -> run -> in-place scatter must give the same logits and the same state rows as the
host-slab runtime for any mix of slots, including across slab growth, resets and snapshots.
"""

from __future__ import annotations

import numpy as np
import pytest

from seqserve.bundle import load_bundle
from seqserve.server.runtime import CpuRuntime

pytest.importorskip("onnx")
from seqserve.server.runtime_cuda import DeviceRuntime  # noqa: E402


def _devices() -> list[str]:
    """The CPU provider always; CUDA too where this onnxruntime has it (a GPU machine)."""
    import onnxruntime

    return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else [])


# cuDNN's kernels sum in another order than the CPU's (TF32 is off, so both are float32)
_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}


@pytest.mark.parametrize("device_name", _devices())
@pytest.mark.parametrize("name", ["lm-lstm", "lm-gru", "feat-gru"])
def test_device_runtime_matches_host_runtime(tiny_models, name, device_name):
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / name / "1")
    host, device = CpuRuntime(bundle, initial_slots=2), DeviceRuntime(bundle, device=device_name, initial_slots=2)
    tol = _TOLERANCE[device_name]
    slots = [(host.store.alloc(), device.store.alloc()) for _ in range(9)]  # both grow 2 -> 4 -> 8 -> 16
    assert [h for h, _ in slots] == [d for _, d in slots] and device.store.capacity == 16
    rng = np.random.default_rng(0)
    m = bundle.manifest
    for round_ in range(6):
        chosen = np.sort(rng.choice(9, size=int(rng.integers(1, 9)), replace=False))
        seq = int(rng.integers(1, 4))
        if m.input_kind == "tokens":
            x = rng.integers(0, m.input_dim, (len(chosen), seq)).astype(np.int64)
        else:
            x = rng.standard_normal((len(chosen), seq, m.input_dim)).astype(np.float32)
        expected = host.run(x, chosen)
        got = device.run(x, chosen)
        assert np.allclose(got, expected, atol=tol), round_
        if round_ == 3:
            host.store.zero(int(chosen[0]))
            device.store.zero(int(chosen[0]))
    for slot in range(9):
        for a, b in zip(host.store.export_rows(slot), device.store.export_rows(slot)):
            assert np.allclose(a, b, atol=tol)
    snapshot = host.store.export_rows(4)
    device.store.import_rows(8, snapshot)
    assert all(np.array_equal(a, b) for a, b in zip(device.store.export_rows(8), snapshot))
    device.store.release(8)
    assert not any(r.any() for r in device.store.export_rows(8))
    assert device.store.state_bytes() == host.store.state_bytes() - host.store.bytes_per_slot()


@pytest.mark.parametrize("device_name", _devices())
def test_dense_state_runs_match(tiny_models, device_name):
    """A generation cohort's path: read rows out, run on the dense state, write them back."""
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / "lm-gru" / "1")
    host, device = CpuRuntime(bundle), DeviceRuntime(bundle, device=device_name)
    tol = _TOLERANCE[device_name]
    for rt in (host, device):
        for _ in range(5):
            rt.store.alloc()
    slots = np.array([3, 0, 4])
    rng = np.random.default_rng(1)
    warm = rng.integers(0, 256, (5, 2)).astype(np.int64)
    host.run(warm, np.arange(5))
    device.run(warm, np.arange(5))
    dense = {rt: rt.read_state(slots) for rt in (host, device)}
    for _ in range(4):
        x = rng.integers(0, 256, (3, 1)).astype(np.int64)
        outs = {}
        for rt in (host, device):
            outs[rt], dense[rt] = rt.run_dense(x, dense[rt])
        assert np.allclose(outs[host], outs[device], atol=tol)
    for rt in (host, device):
        rt.write_state(slots, dense[rt])
    for slot in range(5):
        for a, b in zip(host.store.export_rows(slot)[:1], device.store.export_rows(slot)[:1]):
            assert np.allclose(a, b, atol=tol)
    # the host runtime's slabs now hold the dense result: one more ordinary run agrees with both
    x = rng.integers(0, 256, (3, 1)).astype(np.int64)
    assert np.allclose(host.run(x, slots), device.run(x, slots), atol=tol)


def test_a_failed_step_run_leaves_every_slab_row_unchanged(tiny_models):
    """The step graph scatters only after the model has run: a run that fails (an embedding index
    past the table, which the CPU provider checks) writes nothing."""
    models_dir, _ = tiny_models
    device = DeviceRuntime(load_bundle(models_dir / "lm-lstm" / "1"), device="cpu", initial_slots=4)
    slots = np.array([device.store.alloc() for _ in range(3)])
    device.run(np.array([[1, 2], [3, 4], [5, 6]], np.int64), slots)
    before = [device.store.export_rows(int(s)) for s in slots]
    with pytest.raises(Exception):
        device.run(np.array([[7], [999], [8]], np.int64), slots)
    after = [device.store.export_rows(int(s)) for s in slots]
    assert all(np.array_equal(a, b) for rows_a, rows_b in zip(before, after) for a, b in zip(rows_a, rows_b))
    assert any(r.any() for r in after[0])  # the rows compared hold real state, not zeros


@pytest.mark.parametrize("name", ["lm-lstm", "lm-gru", "cls-lstm", "feat-gru"])
def test_top_k_head_run_matches_run_and_the_numpy_top_k(tiny_models, name):
    """run_top_k is run plus the top-k of each row's last position: same logits, same state
    afterwards, and the ids and log-probs numpy takes from those logits; k from 1 to the width."""
    from seqserve.server.outputs import top_k_rows

    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / name / "1")
    plain, headed = CpuRuntime(bundle, initial_slots=4), CpuRuntime(bundle, initial_slots=4)
    assert headed.has_top_k_head
    m = bundle.manifest
    rng = np.random.default_rng(3)
    slots = np.array([plain.store.alloc() for _ in range(3)])
    assert slots.tolist() == [headed.store.alloc() for _ in range(3)]
    for k in sorted({1, 3, min(5, m.output_size), m.output_size}):
        for rows in ([1], [0, 2]):  # the lone path's one row, and a batch
            chosen, seq = slots[rows], int(rng.integers(1, 4))
            if m.input_kind == "tokens":
                x = rng.integers(0, m.input_dim, (len(chosen), seq)).astype(np.int64)
            else:
                x = rng.standard_normal((len(chosen), seq, m.input_dim)).astype(np.float32)
            expected = plain.run(x, chosen)
            logits, ids, logprobs = headed.run_top_k(x, chosen, k)
            np.testing.assert_array_equal(logits, expected)
            want_ids, want_logprobs = top_k_rows(expected[:, -1, :], k)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-5)
    for slot in slots:
        for a, b in zip(plain.store.export_rows(int(slot)), headed.store.export_rows(int(slot))):
            np.testing.assert_array_equal(a, b)


def test_a_failed_head_run_leaves_the_state_unchanged(tiny_models):
    models_dir, _ = tiny_models
    runtime = CpuRuntime(load_bundle(models_dir / "lm-gru" / "1"), initial_slots=2)
    slot = runtime.store.alloc()
    runtime.run_top_k(np.array([[7, 8]], np.int64), np.array([slot]), 5)
    before = runtime.store.export_rows(slot)
    with pytest.raises(Exception):
        runtime.run_top_k(np.array([[999]], np.int64), np.array([slot]), 5)  # outside the embedding
    assert all(np.array_equal(a, b) for a, b in zip(runtime.store.export_rows(slot), before))
