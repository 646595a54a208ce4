"""What the rest of the server may ask of a model runtime and of the store holding session state.

The scheduler, the generation cohorts and the engine see only these two protocols; the CPU runtime
(cpu.py, state in host memory) and the device runtime (device.py, state resident where the model
runs) implement them, and tests/test_runtime_contract.py runs the same tests against every
implementation present. A later snapshot file, Redis-backed store or second front end meets
these protocols and nothing else.

State rows are float32 ``[layers, rows, hidden]`` per state tensor (``h`` and, for an LSTM, ``c``),
the ONNX graph's own layout. ``read``/``write`` move them bit-exactly; what they hold (host arrays
or device values) is the store's business, and only the runtime of the same device consumes it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class DeviceUnavailable(Exception):
    """The requested device cannot run models here (message says why and what to do)."""


class StateStore(Protocol):
    """Per-model-version recurrent state, one slot per session. The store owns its lock: every
    method is safe to call from the event loop while a model run on another thread uses the store."""

    layers: int
    hidden: int
    n_states: int  # state tensors per slot: 2 for an LSTM (h, c), 1 for a GRU or RNN
    capacity: int  # slots allocated (grows geometrically)
    in_use: int  # slots handed out

    def allocate(self) -> int:
        """A slot holding the model's initial (zero) state."""
        ...

    def release(self, slot: int) -> None: ...

    def zero(self, slot: int) -> None:
        """Back to the initial state (and no last logits)."""
        ...

    def read(self, slots: np.ndarray) -> list[Any]:
        """The slots' state, one ``[layers, len(slots), hidden]`` value per state tensor."""
        ...

    def write(self, slots: np.ndarray, rows: list[Any]) -> None:
        """Store rows (as ``read`` returns them) into the slots."""
        ...

    def export_rows(self, slot: int) -> list[np.ndarray]:
        """Bit-exact host copies of one slot's state ``[layers, 1, hidden]`` each, then its last
        logits ``[1, width]`` for language models (for snapshots and moving sessions)."""
        ...

    def import_rows(self, slot: int, rows: list[np.ndarray]) -> None: ...

    def last_logits(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's logits after its last fed position ``[len(slots), width]`` (language models)."""
        ...

    def set_last_logits(self, slots: np.ndarray, rows: np.ndarray) -> None: ...

    def bytes_per_slot(self) -> int: ...

    def state_bytes(self) -> int:
        """Bytes the live sessions' state takes."""
        ...

    def allocated_bytes(self) -> int:
        """Bytes reserved for all slots (on the host, untouched pages are not resident)."""
        ...


class Runtime(Protocol):
    """One model version on one device: runs that advance slots of its ``store``."""

    device: str  # "cpu" or "cuda"
    provider: str  # the ONNX Runtime execution provider really in use
    top_k_in_run: bool  # run_top_k is available (else take the top-k from run's logits)

    @property
    def store(self) -> StateStore:
        """The slots this runtime's runs advance."""
        ...

    def run(self, x: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Advance ``slots`` by ``x`` ([batch, seq] token ids or [batch, seq, dim] frames); return
        the logits ``[batch, seq, width]`` on the host. The new state is stored only if the run
        succeeded: a failed run leaves every slot as it was."""
        ...

    def run_top_k(self, x: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``run``, plus the ids [batch, k] of each row's largest last-position logits, in
        descending order, and their log-probabilities, computed in the same model run."""
        ...

    def run_dense(self, x: np.ndarray, state: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """Advance a dense state (as ``store.read`` returns it, or as the last ``run_dense`` on it
        returned it; not in the store); return the logits and the new state. Generation cohorts
        keep their rows' state this way. Run only the latest state again. The logits stay as they
        are through the next run on the state, failed or not, and no longer: a runtime may reuse
        their buffers after that, and the state's own once nothing holds it any more."""
        ...
