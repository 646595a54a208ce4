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


@pytest.mark.parametrize("name", ["lm-lstm", "lm-gru", "feat-gru"])
def test_device_runtime_matches_host_runtime(tiny_models, name):
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / name / "1")
    host, device = CpuRuntime(bundle, initial_slots=2), DeviceRuntime(bundle, device="cpu", initial_slots=2)
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
        assert np.allclose(got, expected, atol=1e-5), round_
        if round_ == 3:
            host.store.zero(int(chosen[0]))
            device.store.zero(int(chosen[0]))
    for slot in range(9):
        for a, b in zip(host.store.export_rows(slot), device.store.export_rows(slot)):
            assert np.allclose(a, b, atol=1e-5)
    snapshot = host.store.export_rows(4)
    device.store.import_rows(8, snapshot)
    assert all(np.array_equal(a, b) for a, b in zip(device.store.export_rows(8), snapshot))
    device.store.release(8)
    assert not any(r.any() for r in device.store.export_rows(8))
    assert device.store.state_bytes() == host.store.state_bytes() - host.store.bytes_per_slot()


def test_dense_state_runs_match(tiny_models):
    """A generation cohort's path: read rows out, run on the dense state, write them back."""
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / "lm-gru" / "1")
    host, device = CpuRuntime(bundle), DeviceRuntime(bundle, device="cpu")
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
        assert np.allclose(outs[host], outs[device], atol=1e-5)
    for rt in (host, device):
        rt.write_state(slots, dense[rt])
    for slot in range(5):
        for a, b in zip(host.store.export_rows(slot)[:1], device.store.export_rows(slot)[:1]):
            assert np.allclose(a, b, atol=1e-5)
    # the host runtime's slabs now hold the dense result: one more ordinary run agrees with both
    x = rng.integers(0, 256, (3, 1)).astype(np.int64)
    assert np.allclose(host.run(x, slots), device.run(x, slots), atol=1e-5)
