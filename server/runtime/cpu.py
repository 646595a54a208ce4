"""The CPU runtime: ONNX Runtime's CPU execution provider, state in host memory.

``run(x, slots)`` reads the slots' rows, runs the model and stores the new rows back only when
the run succeeded. ``run_top_k`` does the same with a top-k head built around the model
(graphs.top_k_head_graph), so the lone-session step gets its answer's ids and log-probabilities
from the same run instead of a numpy pass over the logits. ``run_dense`` (generation cohorts)
runs a small cohort on buffers bound once and kept for later cohorts (dense.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from seqserve.bundle import Bundle

from . import dense
from .graphs import HEAD_IDS, HEAD_K, HEAD_LOGPROBS, top_k_head_graph
from .host_store import HostStateStore
from .options import check_layout, logits_width, session_options

log = logging.getLogger("seqserve.server")


def _top_k_head(bundle: Bundle, threads: int) -> Any:
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
        log.warning(
            "%s: no top-k head (%s: %s); lone steps take their top-k from the logits instead",
            bundle.path,
            type(exc).__name__,
            exc,
        )
        return None


class CpuRuntime:
    """A Runtime (base.py) on the CPU execution provider."""

    device = "cpu"
    provider = "CPUExecutionProvider"

    def __init__(self, bundle: Bundle, threads: int = 1, initial_slots: int = 64):
        import onnxruntime as ort

        check_layout(bundle)
        m = bundle.manifest
        self.session = ort.InferenceSession(
            str(bundle.model_path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        # A second session with the head (and a second copy of the weights, a few MB for these
        # models): batches run the plain model, where the head is slower (docs/bench.md).
        self.head = _top_k_head(bundle, threads)
        self.top_k_in_run = self.head is not None
        self.input_name = m.input_name
        self.state_inputs = [s.input for s in m.state]
        self.output_names = [m.logits_name] + [s.output for s in m.state]
        self.head_outputs = self.output_names + [HEAD_IDS, HEAD_LOGPROBS]
        self._k_inputs: dict[int, np.ndarray] = {}  # k -> its int64 [1] array, made once
        self._dense = dense.DenseRuns(
            self.session, (m.input_name, self.state_inputs, m.logits_name, self.output_names[1:]), m.output_size
        )
        self.store = HostStateStore(m.layers, m.hidden_size, len(m.state), logits_width(bundle), initial_slots)

    def run(self, x: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return self._run(self.session, self.output_names, x, slots, None)[0]

    def run_top_k(self, x: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.head is None:
            raise RuntimeError("this runtime has no top-k head (top_k_in_run is False)")
        k_input = self._k_inputs.get(k)
        if k_input is None:
            k_input = self._k_inputs[k] = np.array([k], np.int64)
        out = self._run(self.head, self.head_outputs, x, slots, k_input)
        return out[0], out[-2], out[-1]

    def _run(
        self, session: Any, fetch: list[str], x: np.ndarray, slots: np.ndarray, k_input: np.ndarray | None
    ) -> list[np.ndarray]:
        store = self.store
        state = store.read_one(int(slots[0])) if len(slots) == 1 else store.read(slots)
        feeds = dict(zip(self.state_inputs, state))
        feeds[self.input_name] = x
        if k_input is not None:
            feeds[HEAD_K] = k_input
        out = session.run(fetch, feeds)
        store.store_run(slots, out[1 : 1 + len(self.state_inputs)], out[0])
        return out

    def run_dense(self, x: np.ndarray, state: list[Any]) -> tuple[np.ndarray, list[Any]]:
        if len(x) <= dense.BOUND_ROWS:  # bound buffers, two sets taking turns (dense.py)
            return self._dense.run(x, state)
        feeds = dict(zip(self.state_inputs, state))
        feeds[self.input_name] = x
        out = self.session.run(self.output_names, feeds)
        return out[0], out[1:]
