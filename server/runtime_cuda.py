"""Device-resident state: slabs live where the model runs (the GPU), bound with IO binding.

The state slabs are ORT OrtValues ``[layers, capacity, hidden]`` on the device. A batch of
steps is one run of a *step graph* built at load time around the model, bound to device memory
so state never crosses to the host:

1. ``Gather`` (axis 1) copies the batch's rows out of the slabs into the model's state inputs;
2. the model runs on them; only the token ids go in from the host and only the logits come out;
3. ``ScatterND`` writes the new rows back into the slabs in place (its output is bound to the
   slab itself, so no copy of the slab is made).

Every ONNX Runtime run on a GPU has a fixed cost (launches, a stream sync, the cuDNN RNN's
descriptors), so one run instead of three matters for small batches. If the model fails, the
scatters never run (they need its outputs) and every slot keeps its state. Generation cohorts
keep their rows' state dense between tokens instead (``run_dense``, the plain model) and use the
separate gather and scatter graphs only when their membership changes. All graphs are built with
the ``onnx`` package (graphs.py). The class is device-generic (``device`` is the ORT device name) so the same
code runs on the CPU execution provider in tests without a GPU.
"""

from __future__ import annotations

import logging

import numpy as np

from seqserve.bundle import Bundle

from .graphs import helper_graphs, onnx_module, step_graph
from .runtime import DeviceUnavailable, check_layout, session_options
from .state_store import SlotPool

log = logging.getLogger("seqserve.server")
_PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# TF32 rounds matrix-product inputs to 10 mantissa bits: on for GPUs from Ampere on by default in
# the CUDA provider. Off here, so served numbers match the float32 PyTorch model the bundle
# was checked against; these models are small enough that it costs little.
_CUDA_OPTIONS = {"use_tf32": "0"}


def provider_list(device: str) -> list:
    """ORT providers for ``device``: CUDA with its options and the CPU fallback, or the CPU alone."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return [(_PROVIDERS[device], dict(_CUDA_OPTIONS)), "CPUExecutionProvider"]


def scatter_index(layers: int, slots: np.ndarray) -> np.ndarray:
    """ScatterND's indices for writing rows [layers, len(slots), hidden] into the slabs' ``slots``."""
    where = np.empty((layers, len(slots), 2), np.int64)
    where[:, :, 0] = np.arange(layers)[:, None]
    where[:, :, 1] = np.asarray(slots)[None, :]
    return where


class DeviceSlabStore(SlotPool):
    """State slots in device OrtValues; same interface as state_store.SlabStore."""

    def __init__(self, ort, device: str, sessions, layers: int, hidden: int, n_states: int, logits_width: int,
                 initial_slots: int):
        self._ort, self.device = ort, device
        self._gather, self._scatter = sessions
        self.slabs: list = []
        super().__init__(layers, hidden, n_states, logits_width, initial_slots)

    def _upload(self, array: np.ndarray):
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
        zeros = [np.zeros((self.layers, 1, self.hidden), np.float32)] * self.n_states
        self.write(np.array([slot]), [self._upload(z) for z in zeros])

    def read(self, slots: np.ndarray) -> list:
        """The slots' rows as device OrtValues [layers, len(slots), hidden]."""
        binding = self._gather.io_binding()
        for i, slab in enumerate(self.slabs):
            binding.bind_ortvalue_input(f"slab{i}", slab)
            binding.bind_output(f"rows{i}", self.device)
        binding.bind_cpu_input("slots", np.asarray(slots, np.int64))
        self._gather.run_with_iobinding(binding)
        return binding.get_outputs()

    def write(self, slots: np.ndarray, rows: list) -> None:
        """Store device rows [layers, len(slots), hidden] into the slots, in place."""
        where = scatter_index(self.layers, slots)
        binding = self._scatter.io_binding()
        for i, (slab, row) in enumerate(zip(self.slabs, rows)):
            binding.bind_ortvalue_input(f"slab{i}", slab)
            binding.bind_ortvalue_input(f"rows{i}", row)
            binding.bind_ortvalue_output(f"out{i}", slab)
        binding.bind_cpu_input("where", where)
        self._scatter.run_with_iobinding(binding)

    def export_rows(self, slot: int) -> list[np.ndarray]:
        rows = [r.numpy() for r in self.read(np.array([slot]))]
        if self.last_logits is not None:
            rows.append(self.last_logits[slot:slot + 1].copy())
        return rows

    def import_rows(self, slot: int, rows: list[np.ndarray]) -> None:
        self.write(np.array([slot]), [self._upload(r) for r in rows[:self.n_states]])
        if self.last_logits is not None and len(rows) > self.n_states:
            self.last_logits[slot:slot + 1] = rows[self.n_states]


class DeviceRuntime:
    """A model whose state stays on ``device``; runs with IO binding (see module docstring)."""

    has_top_k_head = False  # the logits come to the host anyway; top-k is taken there

    def __init__(self, bundle: Bundle, device: str = "cuda", threads: int = 1, initial_slots: int = 64):
        import onnxruntime as ort

        check_layout(bundle)
        # ScatterND warns at load that duplicate indices are undefined; a batch never holds a slot twice
        ort.set_default_logger_severity(3)
        self.device = device
        self.provider = _PROVIDERS[device]
        if device == "cuda" and hasattr(ort, "preload_dlls"):
            try:  # finds CUDA/cuDNN installed as nvidia-* wheels; harmless if they are elsewhere
                ort.preload_dlls()
            except Exception as exc:
                log.debug("onnxruntime.preload_dlls failed: %s", exc)
        providers = provider_list(device)
        options = session_options(threads)
        self.session = ort.InferenceSession(str(bundle.model_path), options, providers=providers)
        active = self.session.get_providers()
        if active[0] != self.provider:
            raise DeviceUnavailable(
                f"{self.provider} did not start for {bundle.path.name} (onnxruntime fell back to {active[0]}); "
                "check that the CUDA and cuDNN libraries onnxruntime-gpu was built for are installed")
        try:
            onnx_module()
        except ImportError as exc:
            raise DeviceUnavailable(str(exc)) from None
        gather, scatter = helper_graphs(len(bundle.manifest.state))
        helpers = tuple(ort.InferenceSession(g, session_options(threads), providers=providers) for g in (gather, scatter))
        m = bundle.manifest
        # a second session holding the same weights: generation's dense runs use the plain model
        step = step_graph(bundle.model_path, [s.input for s in m.state], [s.output for s in m.state])
        self.step_session = ort.InferenceSession(step, options, providers=providers)
        self.input_name = m.input_name
        self.state_inputs = [s.input for s in m.state]
        self.state_outputs = [s.output for s in m.state]
        self.logits_name = m.logits_name
        self.store = DeviceSlabStore(ort, device, helpers, m.layers, m.hidden_size, len(m.state),
                                     m.output_size if m.kind == "lm" else 0, initial_slots)

    def run(self, x: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Advance ``slots`` by ``x``: one run of the step graph (gather, model, scatter in place)."""
        store = self.store
        slots = np.asarray(slots, np.int64)
        with store.lock:
            binding = self.step_session.io_binding()
            binding.bind_cpu_input(self.input_name, x)
            binding.bind_cpu_input("slots", slots)
            binding.bind_cpu_input("where", scatter_index(store.layers, slots))
            binding.bind_output(self.logits_name, "cpu")  # bound first: get_outputs() keeps binding order
            for i, slab in enumerate(store.slabs):
                binding.bind_ortvalue_input(f"slab{i}", slab)
                binding.bind_ortvalue_output(f"slab_out{i}", slab)
            self.step_session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()
        if store.last_logits is not None:
            store.last_logits[slots] = logits[:, -1, :]
        return logits


    def read_state(self, slots: np.ndarray) -> list:
        with self.store.lock:
            return self.store.read(slots)

    def write_state(self, slots: np.ndarray, state: list) -> None:
        with self.store.lock:
            self.store.write(slots, state)

    def run_dense(self, x: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        """One run on device-resident dense state (see runtime.CpuRuntime.run_dense)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        for name, value in zip(self.state_inputs, state):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.logits_name, "cpu")
        for name in self.state_outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]


class CudaRuntime(DeviceRuntime):
    """DeviceRuntime on the CUDA execution provider (device 0)."""

    def __init__(self, bundle: Bundle, threads: int = 1, initial_slots: int = 64):
        super().__init__(bundle, "cuda", threads, initial_slots)
