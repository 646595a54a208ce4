"""Every Runtime and StateStore implementation (server/runtime/base.py) passes the same tests.

The implementations present: the CPU runtime with its host store; the device runtime on the CPU
execution provider (the CUDA path's code: device slabs, the step graph, IO binding); and, on a
machine whose onnxruntime has CUDA, the device runtime on CUDA. References are plain ONNX Runtime
sessions of the bundle's model fed whole sequences, independent of the runtime code.
"""

from __future__ import annotations

import numpy as np
import pytest

from seqserve.bundle import load_bundle
from seqserve.server.outputs import top_k_rows
from seqserve.server.runtime.cpu import CpuRuntime

pytest.importorskip("onnx")
from seqserve.server.runtime.device import DeviceRuntime  # noqa: E402


def _kinds() -> list[str]:
    import onnxruntime

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return ["cpu", "device-on-cpu"] + (["cuda"] if cuda else [])


KINDS = _kinds()
# cuDNN's kernels sum in another order than the CPU's (TF32 is off, so both are float32)
TOLERANCE = {"cpu": 1e-5, "device-on-cpu": 1e-5, "cuda": 1e-4}


def make(kind: str, bundle, initial_slots: int = 2):
    if kind == "cpu":
        return CpuRuntime(bundle, initial_slots=initial_slots)
    return DeviceRuntime(bundle, device="cuda" if kind == "cuda" else "cpu", initial_slots=initial_slots)


def inputs(manifest, rng, rows: int, seq: int) -> np.ndarray:
    if manifest.input_kind == "tokens":
        return rng.integers(0, manifest.input_dim, (rows, seq)).astype(np.int64)
    return rng.standard_normal((rows, seq, manifest.input_dim)).astype(np.float32)


class Reference:
    """The bundle's model in a plain ORT session: each sequence fed whole from the zero state."""

    def __init__(self, bundle):
        import onnxruntime

        self.m = bundle.manifest
        self.session = onnxruntime.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        m = self.m
        zeros = np.zeros((m.layers, len(x), m.hidden_size), np.float32)
        feeds = {m.input_name: x, **{s.input: zeros for s in m.state}}
        out = self.session.run([m.logits_name] + [s.output for s in m.state], feeds)
        return out[0], out[1:]


@pytest.mark.parametrize("kind", KINDS)
def test_store_slots_growth_rows_and_accounting(tiny_models, kind):
    models_dir, _ = tiny_models
    store = make(kind, load_bundle(models_dir / "lm-lstm" / "1")).store
    layers, hidden = store.layers, store.hidden
    slots = [store.allocate() for _ in range(5)]  # grows 2 -> 4 -> 8
    assert slots == [0, 1, 2, 3, 4] and store.capacity == 8 and store.in_use == 5
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((layers, 1, hidden)).astype(np.float32) for _ in range(store.n_states)]
    last = rng.standard_normal((1, store.logits_width)).astype(np.float32)
    store.import_rows(4, rows + [last])
    got = store.export_rows(4)
    assert all(np.array_equal(a, b) for a, b in zip(got, rows + [last]))  # bit-exact
    dense = store.read(np.array([4, 1]))  # read/write move rows as the store holds them
    store.write(np.array([2, 3]), dense)
    assert all(np.array_equal(a, b) for a, b in zip(store.export_rows(2)[:-1], rows))
    assert not any(r.any() for r in store.export_rows(3))  # slot 1 was zero
    store.set_last_logits(np.array([3]), last)
    assert np.array_equal(store.last_logits(np.array([3])), last)
    for _ in range(4):  # growth keeps every row
        store.allocate()
    assert store.capacity == 16 and np.array_equal(store.export_rows(4)[0], rows[0])
    store.release(4)
    assert store.in_use == 8 and not any(r.any() for r in store.export_rows(4))
    assert store.allocate() == 4  # lowest free slot first
    store.zero(2)
    assert not any(r.any() for r in store.export_rows(2))
    per_slot = 4 * (store.n_states * layers * hidden + store.logits_width)
    assert store.bytes_per_slot() == per_slot and store.state_bytes() == 9 * per_slot
    assert store.allocated_bytes() == 16 * per_slot
    with pytest.raises(ValueError):
        store.import_rows(4, [np.zeros((layers, 2, hidden), np.float32)] * store.n_states)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["lm-lstm", "lm-gru", "feat-gru", "cls-lstm"])
def test_chunked_runs_match_the_whole_sequence(tiny_models, kind, name):
    """Any mix of slots, chunk lengths, growth and resets: each slot's logits and state equal one
    whole-sequence run of everything it was fed since its last reset."""
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / name / "1")
    runtime, ref, tol = make(kind, bundle), Reference(bundle), TOLERANCE[kind]
    m = bundle.manifest
    slots = [runtime.store.allocate() for _ in range(9)]
    fed: dict[int, list[np.ndarray]] = {s: [] for s in slots}
    rng = np.random.default_rng(1)
    for round_ in range(6):
        chosen = np.sort(rng.choice(slots, size=int(rng.integers(1, 9)), replace=False))
        x = inputs(m, rng, len(chosen), int(rng.integers(1, 4)))
        logits = runtime.run(x, chosen)
        for row, slot in enumerate(chosen):
            fed[int(slot)].append(x[row])
            whole, _ = ref.run(np.concatenate(fed[int(slot)])[None])
            np.testing.assert_allclose(logits[row], whole[0, -x.shape[1] :], atol=tol, err_msg=f"round {round_}")
        if round_ == 3:
            runtime.store.zero(int(chosen[0]))
            fed[int(chosen[0])] = []
    for slot, history in fed.items():
        if history:
            _, state = ref.run(np.concatenate(history)[None])
            for got, want in zip(runtime.store.export_rows(slot), state):
                np.testing.assert_allclose(got, want, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [3, 20])  # the CPU runtime binds cohorts of up to dense.BOUND_ROWS
def test_dense_runs_then_write_equal_ordinary_runs(tiny_models, kind, rows):
    """A generation cohort's path: read rows out, run on the dense state, write them back."""
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / "lm-gru" / "1")
    dense_rt, plain_rt, tol = make(kind, bundle), make(kind, bundle), TOLERANCE[kind]
    total = rows + 2
    for rt in (dense_rt, plain_rt):
        for _ in range(total):
            rt.store.allocate()
    rng = np.random.default_rng(2)
    warm = inputs(bundle.manifest, rng, total, 2)
    dense_rt.run(warm, np.arange(total))
    plain_rt.run(warm, np.arange(total))
    slots = rng.permutation(total)[:rows]
    dense = dense_rt.store.read(slots)
    for _ in range(4):
        x = inputs(bundle.manifest, rng, rows, 1)
        got, dense = dense_rt.run_dense(x, dense)
        np.testing.assert_allclose(got, plain_rt.run(x, slots), atol=tol)
    dense_rt.store.write(slots, dense)
    for slot in range(total):
        for a, b in zip(dense_rt.store.export_rows(slot)[:1], plain_rt.store.export_rows(slot)[:1]):
            np.testing.assert_allclose(a, b, atol=tol)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "cuda"])  # CUDA's Gather does not check indices
def test_a_failed_dense_run_leaves_the_dense_state_as_it_was(tiny_models, kind):
    """A cohort whose run fails keeps its rows' state: the next run on the same state gives what
    it would have given without the failed one, and the arrays the store read are not written."""
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / "lm-lstm" / "1")
    runtime, tol = make(kind, bundle, initial_slots=4), TOLERANCE[kind]
    slots = np.array([runtime.store.allocate() for _ in range(2)])
    runtime.run(np.array([[1, 2], [3, 4]], np.int64), slots)
    read = runtime.store.read(slots)
    kept = [np.array(a) for a in read] if kind == "cpu" else None
    first, state = runtime.run_dense(np.array([[5], [6]], np.int64), read)
    first_copy = np.array(first)
    twin = make(kind, bundle, initial_slots=4)  # the same tokens through ordinary runs
    want = twin.run(
        np.array([[1, 2, 5, 7], [3, 4, 6, 8]], np.int64), np.array([twin.store.allocate() for _ in range(2)])
    )
    with pytest.raises(Exception):
        runtime.run_dense(np.array([[7], [999]], np.int64), state)
    got, state = runtime.run_dense(np.array([[7], [8]], np.int64), state)
    np.testing.assert_allclose(got[:, -1], want[:, -1], atol=tol)
    # a run's logits stay as they were through the run after it (a cohort reads them after a burst)
    np.testing.assert_array_equal(first, first_copy)
    got, _ = runtime.run_dense(np.array([[9], [9]], np.int64), state)  # and it goes on from there
    assert got.shape == (2, 1, bundle.manifest.output_size)
    if kept is not None:  # the store's arrays were copied, not run on
        assert all(np.array_equal(a, b) for a, b in zip(read, kept))


def test_only_the_latest_dense_state_runs_again(tiny_models):
    """The CPU runtime's dense runs take turns on two buffer sets: a state two runs old points at a
    set the last run overwrote, so running it again is refused rather than answered wrongly."""
    models_dir, _ = tiny_models
    runtime = CpuRuntime(load_bundle(models_dir / "lm-gru" / "1"), initial_slots=2)
    slots = np.array([runtime.store.allocate()])
    x = np.array([[3]], np.int64)
    _, first = runtime.run_dense(x, runtime.store.read(slots))
    _, second = runtime.run_dense(x, first)
    runtime.run_dense(x, second)
    with pytest.raises(RuntimeError, match="advanced already"):
        runtime.run_dense(x, first)


def test_bound_runs_go_to_a_later_cohort_only_once_nothing_holds_their_state(tiny_models):
    """The CPU runtime keeps its bound dense runs for later cohorts of the same shape: a cohort
    whose state is still held keeps them to itself, a later one gets them once it is gone (also
    after a first run that failed), and each cohort's runs continue from its own rows."""
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / "lm-lstm" / "1")
    runtime, twin = CpuRuntime(bundle, initial_slots=4), CpuRuntime(bundle, initial_slots=4)
    for rt in (runtime, twin):
        slots = np.array([rt.store.allocate() for _ in range(4)])
        rt.run(np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.int64), slots)  # four different states

    def expected(slot: int, token: int) -> np.ndarray:
        return twin.run(np.array([[token]], np.int64), np.array([slot]))

    x = np.array([[9]], np.int64)
    got, held = runtime.run_dense(x, runtime.store.read(np.array([0])))
    np.testing.assert_allclose(got, expected(0, 9), atol=1e-5)
    first_runs = held.runs
    got, other = runtime.run_dense(x, runtime.store.read(np.array([1])))  # the first state is held
    assert other.runs is not first_runs
    np.testing.assert_allclose(got, expected(1, 9), atol=1e-5)
    got, held = runtime.run_dense(np.array([[10]], np.int64), held)  # and goes on from its own rows
    np.testing.assert_allclose(got, expected(0, 10), atol=1e-5)

    del held  # the first cohort's state is written back and dropped: its runs are free
    with pytest.raises(Exception):  # a failed first run hands them back too
        runtime.run_dense(np.array([[999]], np.int64), runtime.store.read(np.array([2])))
    got, later = runtime.run_dense(x, runtime.store.read(np.array([2])))
    assert later.runs is first_runs
    np.testing.assert_allclose(got, expected(2, 9), atol=1e-5)  # from slot 2's rows, not stale ones
    got, other = runtime.run_dense(x, other)  # the second cohort was not disturbed
    np.testing.assert_allclose(got, expected(1, 9), atol=1e-5)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "cuda"])  # CUDA's Gather does not check indices
def test_a_failed_run_leaves_every_row_unchanged(tiny_models, kind):
    """State is stored only after the model ran: a run that fails (an embedding index past the
    table, which the CPU provider checks) writes nothing."""
    models_dir, _ = tiny_models
    runtime = make(kind, load_bundle(models_dir / "lm-lstm" / "1"), initial_slots=4)
    slots = np.array([runtime.store.allocate() for _ in range(3)])
    runtime.run(np.array([[1, 2], [3, 4], [5, 6]], np.int64), slots)
    before = [runtime.store.export_rows(int(s)) for s in slots]
    with pytest.raises(Exception):
        runtime.run(np.array([[7], [999], [8]], np.int64), slots)
    with pytest.raises(Exception):
        runtime.run(np.array([[999]], np.int64), slots[:1])  # the lone-session path too
    if runtime.top_k_in_run:
        with pytest.raises(Exception):
            runtime.run_top_k(np.array([[999]], np.int64), slots[:1], 5)
    after = [runtime.store.export_rows(int(s)) for s in slots]
    assert all(np.array_equal(a, b) for rows_a, rows_b in zip(before, after) for a, b in zip(rows_a, rows_b))
    assert any(r.any() for r in after[0])  # the rows compared hold real state, not zeros


@pytest.mark.parametrize("name", ["lm-lstm", "lm-gru", "cls-lstm", "feat-gru"])
def test_top_k_in_the_run_matches_run_and_the_numpy_top_k(tiny_models, name):
    """run_top_k (runtimes with top_k_in_run) is run plus the top-k of each row's last position:
    same logits, same state afterwards, the ids and log-probs numpy takes; k from 1 to the width."""
    models_dir, _ = tiny_models
    bundle = load_bundle(models_dir / name / "1")
    runtimes = [make(kind, bundle, 4) for kind in KINDS]
    headed = [rt for rt in runtimes if rt.top_k_in_run]
    assert headed, "the CPU runtime computes the top-k in its run"
    for rt in runtimes:
        if not rt.top_k_in_run:
            with pytest.raises(RuntimeError):
                rt.run_top_k(inputs(bundle.manifest, np.random.default_rng(0), 1, 1), np.array([0]), 1)
    m = bundle.manifest
    for rt in headed:
        plain = make("cpu", bundle, 4)
        rng = np.random.default_rng(3)
        slots = np.array([plain.store.allocate() for _ in range(3)])
        assert slots.tolist() == [rt.store.allocate() for _ in range(3)]
        for k in sorted({1, 3, min(5, m.output_size), m.output_size}):
            for rows in ([1], [0, 2]):  # the lone path's one row, and a batch
                chosen = slots[rows]
                x = inputs(m, rng, len(chosen), int(rng.integers(1, 4)))
                expected = plain.run(x, chosen)
                logits, ids, logprobs = rt.run_top_k(x, chosen, k)
                np.testing.assert_array_equal(logits, expected)
                want_ids, want_logprobs = top_k_rows(expected[:, -1, :], k)
                np.testing.assert_array_equal(ids, want_ids)
                np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-5)
        for slot in slots:
            for a, b in zip(plain.store.export_rows(int(slot)), rt.store.export_rows(int(slot))):
                np.testing.assert_array_equal(a, b)
