"""Write a versioned model bundle: export to ONNX, check parity, write the manifest."""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path
from typing import Any

from seqserve.bundle import (
    MODEL_FILE,
    Bundle,
    Manifest,
    StateSpec,
    TensorSpec,
    load_bundle,
    next_version,
    sha256_file,
    write_manifest,
)

from .model import RecurrentModel
from .onnx_export import OPSET, export_onnx, io_names
from .parity import check_dynamic_axes, check_parity


def build_manifest(
    model: RecurrentModel,
    name: str,
    version: int,
    kind: str,
    onnx_sha256: str,
    *,
    labels: list[str] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    parity: dict[str, Any] | None = None,
) -> Manifest:
    cfg = model.config
    in_names, out_names = io_names(model)
    state_shape = [cfg.layers, "batch", cfg.hidden_size]
    if cfg.input_kind == "tokens":
        data_in = TensorSpec(in_names[0], "int64", ["batch", "seq"])
    else:
        data_in = TensorSpec(in_names[0], "float32", ["batch", "seq", cfg.input_dim])
    inputs = [data_in] + [TensorSpec(n, "float32", state_shape, batch_axis=1) for n in in_names[1:]]
    outputs = [TensorSpec(out_names[0], "float32", ["batch", "seq", cfg.output_size])]
    outputs += [TensorSpec(n, "float32", state_shape, batch_axis=1) for n in out_names[1:]]
    state = [StateSpec(i, o, 1, state_shape) for i, o in zip(in_names[1:], out_names[1:])]
    return Manifest(
        name=name,
        version=version,
        kind=kind,
        cell=cfg.cell,
        layers=cfg.layers,
        hidden_size=cfg.hidden_size,
        embedding_size=cfg.embedding_size if cfg.input_kind == "tokens" else None,
        input_kind=cfg.input_kind,
        input_dim=cfg.input_dim,
        output_size=cfg.output_size,
        labels=labels,
        inputs=inputs,
        outputs=outputs,
        state=state,
        opset=OPSET,
        onnx_sha256=onnx_sha256,
        data=data or {},
        metrics=metrics or {},
        parity=parity or {},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_bundle(
    model: RecurrentModel,
    root: Path | str,
    name: str,
    kind: str,
    *,
    version: int | None = None,
    labels: list[str] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    parity_seed: int = 0,
) -> Bundle:
    """Export ``model`` to ``root/name/version/`` (next free version by default).

    The bundle is assembled in a temporary folder and moved into place only after the parity
    check passes, so a failed export never leaves a half-written version behind.
    """
    root = Path(root)
    version = version or next_version(root, name)
    final = root / name / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists; versions are immutable")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=root))
    try:
        onnx_path = export_onnx(model, staging / MODEL_FILE)
        check_dynamic_axes(onnx_path)
        parity = check_parity(model, onnx_path, seed=parity_seed)
        manifest = build_manifest(
            model,
            name,
            version,
            kind,
            sha256_file(onnx_path),
            labels=labels,
            data=data,
            metrics=metrics,
            parity=parity,
        )
        write_manifest(staging, manifest)
        for target, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / target)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return load_bundle(final)
