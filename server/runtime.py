"""ONNX Runtime execution for one model version, with the state store behind it.

A runtime owns an ``InferenceSession`` and the slots holding its sessions' recurrent state. Its
hot method, ``run(x, slots)``, advances the given slots by the input ``x`` ([batch, seq] token ids
or [batch, seq, dim] frames) and returns the logits ``[batch, seq, outputs]`` on the host; the new
state is stored back only when the run succeeded, so a failed run leaves every slot as it was.
``run_top_k(x, slots, k)`` does the same and also returns the top-k ids and log-probabilities of
each row's last position, computed in the same ORT run by a head built around the model
(graphs.top_k_head_graph): the lone-session step answers without a numpy pass over the logits.
``read_state`` / ``run_dense`` / ``write_state`` let a generation cohort keep its rows' state out
of the slabs while its membership does not change (one model run per tick, nothing gathered).

This module is the CPU runtime and the device choice; the CUDA runtime (state resident on the
GPU, IO binding) lives in runtime_cuda.py behind the same interface.
"""

from __future__ import annotations

import logging

import numpy as np

from seqserve.bundle import Bundle, BundleError

from .graphs import HEAD_IDS, HEAD_K, HEAD_LOGPROBS, top_k_head_graph
from .state_store import SlabStore

log = logging.getLogger("seqserve.server")


class DeviceUnavailable(Exception):
    """The requested device cannot run models here (message says why and what to do)."""


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads == 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def check_layout(bundle: Bundle) -> None:
    """The slabs assume the contract's state layout [layers, batch, hidden]; refuse anything else."""
    m = bundle.manifest
    for spec in m.state:
        dims = list(spec.shape)
        if spec.batch_axis != 1 or len(dims) != 3 or int(dims[0]) != m.layers or int(dims[2]) != m.hidden_size:
            raise BundleError(f"{bundle.path}: state {spec.input} must be [layers, batch, hidden] with batch axis 1, "
                              f"manifest says shape {dims} batch axis {spec.batch_axis}")


def _top_k_head(bundle: Bundle, threads: int):
    """An ORT session of the model with the top-k head, or None where there is none to build."""
    import onnxruntime as ort

    if bundle.manifest.kind == "regressor":
        return None  # raw values: nothing to rank
    try:
        graph = top_k_head_graph(bundle.model_path, bundle.manifest.logits_name)
        if graph is None:
            log.info("%s: opset too old for the top-k head; lone steps take their top-k from the logits", bundle.path)
            return None
        return ort.InferenceSession(graph, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # an optimisation only: serve without it rather than not at all
        log.warning("%s: no top-k head (%s: %s); lone steps take their top-k from the logits instead",
                    bundle.path, type(exc).__name__, exc)
        return None


class CpuRuntime:
    """Model runs on the CPU execution provider; state in host-memory slabs."""

    device = "cpu"
    provider = "CPUExecutionProvider"

    def __init__(self, bundle: Bundle, threads: int = 1, initial_slots: int = 64):
        import onnxruntime as ort

        check_layout(bundle)
        m = bundle.manifest
        self.session = ort.InferenceSession(str(bundle.model_path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        # A second session with the head (and a second copy of the weights, a few MB for these
        # models): batches run the plain model, where the head measured 6-8% slower at 256 rows.
        self.head = _top_k_head(bundle, threads)
        self.input_name = m.input_name
        self.state_inputs = [s.input for s in m.state]
        self.output_names = [m.logits_name] + [s.output for s in m.state]
        self.head_outputs = self.output_names + [HEAD_IDS, HEAD_LOGPROBS]
        self._k_inputs = {}  # k -> its int64 [1] array, made once
        self.store = SlabStore(m.layers, m.hidden_size, len(m.state),
                               m.output_size if m.kind == "lm" else 0, initial_slots)

    @property
    def has_top_k_head(self) -> bool:
        return self.head is not None

    def run(self, x: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return self._run(self.session, self.output_names, x, slots, None)[0]

    def run_top_k(self, x: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``run``, plus ids [batch, k] by descending last-position logit and their log-probs
        (needs ``has_top_k_head``; ``k`` at most the logits' width)."""
        k_input = self._k_inputs.get(k)
        if k_input is None:
            k_input = self._k_inputs[k] = np.array([k], np.int64)
        out = self._run(self.head, self.head_outputs, x, slots, k_input)
        return out[0], out[-2], out[-1]

    def _run(self, session, fetch: list[str], x: np.ndarray, slots: np.ndarray, k_input) -> list[np.ndarray]:
        store = self.store
        one = len(slots) == 1
        n = len(self.state_inputs)
        with store.lock:
            state = store.gather_one(int(slots[0])) if one else store.gather(slots)
            feeds = dict(zip(self.state_inputs, state))
            feeds[self.input_name] = x
            if k_input is not None:
                feeds[HEAD_K] = k_input
            out = session.run(fetch, feeds)
            logits, new_state = out[0], out[1:1 + n]
            if one:
                store.scatter_one(int(slots[0]), new_state, logits)
            else:
                store.scatter(slots, new_state, logits)
        return out

    # A generation cohort keeps its rows' state out of the slabs between membership changes:
    def read_state(self, slots: np.ndarray) -> list[np.ndarray]:
        with self.store.lock:
            return self.store.gather(slots)

    def write_state(self, slots: np.ndarray, state: list[np.ndarray]) -> None:
        with self.store.lock:
            self.store.write_states(slots, state)

    def run_dense(self, x: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Advance a dense state [layers, batch, hidden] (not in the slabs); return logits, new state."""
        feeds = dict(zip(self.state_inputs, state))
        feeds[self.input_name] = x
        out = self.session.run(self.output_names, feeds)
        return out[0], out[1:]


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda' for ``requested`` in auto|cpu|cuda; raise DeviceUnavailable for an impossible cuda."""
    import onnxruntime as ort

    if requested == "cpu":
        return "cpu"
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if requested == "cuda" and not has_cuda:
        raise DeviceUnavailable(
            f"--device cuda: this onnxruntime {ort.__version__} has no CUDA execution provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime, or use --device cpu")
    return "cuda" if has_cuda else "cpu"


def make_runtime(bundle: Bundle, device: str, threads: int, initial_slots: int):
    """A runtime for ``bundle`` on ``device`` ('cpu' or 'cuda', as resolved by resolve_device)."""
    if device == "cuda":
        from .runtime_cuda import CudaRuntime

        return CudaRuntime(bundle, threads=threads, initial_slots=initial_slots)
    return CpuRuntime(bundle, threads=threads, initial_slots=initial_slots)
