"""Device-resident recurrent state: slabs that live where the model runs, moved with IO binding.

The slabs are ORT OrtValues ``[layers, capacity, hidden]`` on the device. ``read`` gathers rows
with a small Gather graph and ``write`` scatters them back in place with a ScatterND graph
(graphs.helper_graphs), so state never crosses to the host on its way. The device runtime's step
graph reads and writes the slabs itself, holding the store's lock (``locked``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .slots import SlotPool


def scatter_index(layers: int, slots: np.ndarray) -> np.ndarray:
    """ScatterND's indices for writing rows [layers, len(slots), hidden] into the slabs' ``slots``."""
    where = np.empty((layers, len(slots), 2), np.int64)
    where[:, :, 0] = np.arange(layers)[:, None]
    where[:, :, 1] = np.asarray(slots)[None, :]
    return where


class DeviceStateStore(SlotPool):
    """A StateStore (base.py) in device OrtValues."""

    def __init__(
        self,
        ort: Any,
        device: str,
        sessions: tuple[Any, Any],
        layers: int,
        hidden: int,
        n_states: int,
        logits_width: int,
        initial_slots: int,
    ):
        self._ort, self.device = ort, device
        self._gather, self._scatter = sessions
        self.slabs: list[Any] = []
        super().__init__(layers, hidden, n_states, logits_width, initial_slots)

    def _upload(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _grow_slabs(self, old: int, new_capacity: int) -> None:
        grown = []
        for i in range(self.n_states):
            host = np.zeros((self.layers, new_capacity, self.hidden), np.float32)
            if old:
                host[:, :old] = self.slabs[i].numpy()  # rare (geometric growth): a host round trip is fine
            grown.append(self._upload(host))
        self.slabs = grown

    def _zero_state(self, slot: int) -> None:
        zeros = np.zeros((self.layers, 1, self.hidden), np.float32)
        self._write(np.array([slot]), [self._upload(zeros) for _ in range(self.n_states)])

    def _read(self, slots: np.ndarray) -> list[Any]:
        binding = self._gather.io_binding()
        for i, slab in enumerate(self.slabs):
            binding.bind_ortvalue_input(f"slab{i}", slab)
            binding.bind_output(f"rows{i}", self.device)
        binding.bind_cpu_input("slots", np.asarray(slots, np.int64))
        self._gather.run_with_iobinding(binding)
        return binding.get_outputs()

    def _write(self, slots: np.ndarray, rows: list[Any]) -> None:
        binding = self._scatter.io_binding()
        for i, (slab, row) in enumerate(zip(self.slabs, rows)):
            binding.bind_ortvalue_input(f"slab{i}", slab)
            binding.bind_ortvalue_input(f"rows{i}", row)
            binding.bind_ortvalue_output(f"out{i}", slab)
        binding.bind_cpu_input("where", scatter_index(self.layers, slots))
        self._scatter.run_with_iobinding(binding)

    def _to_host(self, value: Any) -> np.ndarray:
        return value.numpy()

    def _from_host(self, array: np.ndarray) -> Any:
        return self._upload(array)
