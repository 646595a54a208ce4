"""ONNX Runtime settings and the checks every runtime shares."""

from __future__ import annotations

from typing import Any

from seqserve.bundle import Bundle, BundleError

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# TF32 rounds matrix-product inputs to 10 mantissa bits: on for GPUs from Ampere on by default in
# the CUDA provider. Off here, so served numbers match the float32 PyTorch model the bundle
# was checked against; these models are small enough that it costs little.
_CUDA_OPTIONS = {"use_tf32": "0"}


def session_options(threads: int) -> Any:
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


def provider_list(device: str) -> list:
    """ORT providers for ``device``: CUDA with its options and the CPU fallback, or the CPU alone."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return [(PROVIDERS[device], dict(_CUDA_OPTIONS)), "CPUExecutionProvider"]


def check_layout(bundle: Bundle) -> None:
    """The stores assume the contract's state layout [layers, batch, hidden]; refuse anything else."""
    m = bundle.manifest
    for spec in m.state:
        dims = list(spec.shape)
        if spec.batch_axis != 1 or len(dims) != 3 or int(dims[0]) != m.layers or int(dims[2]) != m.hidden_size:
            raise BundleError(
                f"{bundle.path}: state {spec.input} must be [layers, batch, hidden] with batch axis 1, "
                f"manifest says shape {dims} batch axis {spec.batch_axis}"
            )


def logits_width(bundle: Bundle) -> int:
    """Width of the last-logits row a store keeps per slot: language models only."""
    m = bundle.manifest
    return m.output_size if m.kind == "lm" else 0
