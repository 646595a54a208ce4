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
the ``onnx`` package (graphs.py). The class is device-generic (``device`` is the ORT device name), so
the same code runs on the CPU execution provider in the contract tests on machines without a GPU.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from seqserve.bundle import Bundle

from .base import DeviceUnavailable
from .device_store import DeviceStateStore, scatter_index
from .graphs import helper_graphs, onnx_module, step_graph
from .options import PROVIDERS, check_layout, logits_width, provider_list, session_options

log = logging.getLogger("seqserve.server")


class DeviceRuntime:
    """A Runtime (base.py) whose state stays on ``device``; runs with IO binding (see above)."""

    top_k_in_run = False  # the logits come to the host anyway; top-k is taken there

    def __init__(self, bundle: Bundle, device: str = "cuda", threads: int = 1, initial_slots: int = 64):
        import onnxruntime as ort

        check_layout(bundle)
        # ScatterND warns at load that duplicate indices are undefined; a batch never holds a slot twice
        ort.set_default_logger_severity(3)
        self.device = device
        self.provider = PROVIDERS[device]
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
                "check that the CUDA and cuDNN libraries onnxruntime-gpu was built for are installed"
            )
        try:
            onnx_module()
        except ImportError as exc:
            raise DeviceUnavailable(str(exc)) from None
        gather, scatter = helper_graphs(len(bundle.manifest.state))
        helpers = tuple(
            ort.InferenceSession(g, session_options(threads), providers=providers) for g in (gather, scatter)
        )
        m = bundle.manifest
        # a second session holding the same weights: generation's dense runs use the plain model
        step = step_graph(bundle.model_path, [s.input for s in m.state], [s.output for s in m.state])
        self.step_session = ort.InferenceSession(step, options, providers=providers)
        self.input_name = m.input_name
        self.state_inputs = [s.input for s in m.state]
        self.state_outputs = [s.output for s in m.state]
        self.logits_name = m.logits_name
        self.store = DeviceStateStore(
            ort, device, helpers, m.layers, m.hidden_size, len(m.state), logits_width(bundle), initial_slots
        )

    def run(self, x: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Advance ``slots`` by ``x``: one run of the step graph (gather, model, scatter in place)."""
        store = self.store
        slots = np.asarray(slots, np.int64)
        with store.locked():
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
        store.set_last_logits(slots, logits[:, -1, :])
        return logits

    def run_top_k(self, x: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise RuntimeError("the device runtime has no top-k head (top_k_in_run is False)")

    def run_dense(self, x: np.ndarray, state: list[Any]) -> tuple[np.ndarray, list[Any]]:
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
