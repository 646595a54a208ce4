"""Model runtimes and the stores of session state behind them (see base.py for the protocols).

``make_runtime`` is the one factory: the rest of the server never names an implementation.
"""

from __future__ import annotations

from seqserve.bundle import Bundle

from .base import DeviceUnavailable, Runtime, StateStore

__all__ = ["DeviceUnavailable", "Runtime", "StateStore", "make_runtime", "resolve_device"]


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
            f"(available: {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime, or use --device cpu"
        )
    return "cuda" if has_cuda else "cpu"


def make_runtime(bundle: Bundle, device: str, threads: int, initial_slots: int) -> Runtime:
    """A runtime for ``bundle`` on ``device`` ('cpu' or 'cuda', as resolved by resolve_device)."""
    if device == "cuda":
        from .device import DeviceRuntime

        return DeviceRuntime(bundle, "cuda", threads=threads, initial_slots=initial_slots)
    from .cpu import CpuRuntime

    return CpuRuntime(bundle, threads=threads, initial_slots=initial_slots)
