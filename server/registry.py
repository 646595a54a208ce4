"""The models being served: every bundle under the models folder, each with its runtime.

A request names a model and optionally a version; without one it gets the latest. The manifest
drives everything model-specific (tensor names, state shapes, input kind, vocabulary), and the
facts the hot path checks on every step are precomputed here as plain attributes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqserve.bundle import Bundle, BundleError, Manifest, discover, load_bundle

from .domain import OutputSpec
from .errors import Reason, not_found
from .outputs import OutputPlan, default_plan, parse_output
from .runtime import DeviceUnavailable, Runtime, make_runtime, resolve_device

log = logging.getLogger("seqserve.server")


@dataclass(eq=False)
class ModelVersion:
    """One loaded bundle: its manifest, its runtime and the facts requests are checked against."""

    bundle: Bundle
    runtime: Runtime
    tokens: bool = field(init=False)  # input kind is token ids (else float frames)
    vocab: int = field(init=False)  # token ids must be < vocab
    frame_bytes: int = field(init=False)  # bytes per feature frame (features models)
    width: int = field(init=False)  # logits per position
    can_generate: bool = field(init=False)  # an LM over tokens whose outputs are its inputs
    regressor: bool = field(init=False)  # outputs are raw values: returned as logits, no top-k
    default_plan: OutputPlan = field(init=False)  # what a step without an OutputSpec returns
    key: str = field(init=False)  # "name:version", looked up on every step
    # plans of OutputSpecs seen, by the spec's identity (the API layer converts each distinct spec
    # once, so a client's steps bring the same object): (spec, plan), the spec kept so its id stays its own
    plans: dict = field(init=False, repr=False)
    load_seconds: float = 0.0  # reading the bundle and building its runtime

    def __post_init__(self) -> None:
        m = self.manifest
        self.tokens = m.input_kind == "tokens"
        self.vocab = m.input_dim if self.tokens else 0
        self.frame_bytes = 0 if self.tokens else 4 * m.input_dim
        self.width = m.output_size
        self.can_generate = m.kind == "lm" and self.tokens and m.output_size <= m.input_dim
        self.regressor = m.kind == "regressor"
        self.default_plan = default_plan(self.regressor, self.width)
        self.key = f"{m.name}:{m.version}"
        self.plans = {}

    def plan(self, spec: OutputSpec) -> OutputPlan:
        """``parse_output(spec)`` for this model, parsed once per spec object (raises as it does)."""
        hit = self.plans.get(id(spec))
        if hit is not None and hit[0] is spec:
            return hit[1]
        plan = parse_output(spec, self.width, self.regressor)
        if len(self.plans) < 1024:  # bounded: specs made per request (no API cache) just miss
            self.plans[id(spec)] = (spec, plan)
        return plan

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


class Registry:
    """Loads every bundle under a folder and finds them by name and version."""

    def __init__(self, models_dir: str | Path, device: str = "auto", threads: int = 1, initial_slots: int = 64):
        self.models_dir = Path(models_dir)
        self.requested_device = device
        self.device = resolve_device(device)
        self.threads = threads
        self.initial_slots = initial_slots
        self.models: dict[str, dict[int, ModelVersion]] = {}

    def find(self) -> dict[str, dict[int, Path]]:
        """The bundle folders under the models folder (cheap: nothing is loaded); BundleError if none."""
        try:
            found = discover(self.models_dir)
        except BundleError:
            raise BundleError(f"model directory {self.models_dir} does not exist") from None
        if not found:
            raise BundleError(
                f"no servable model bundles under {self.models_dir} (expected <name>/<version>/manifest.json)"
            )
        return found

    def load_all(self) -> list[ModelVersion]:
        """Load every bundle; a broken one is logged and skipped. Raise BundleError if none loads."""
        found = self.find()
        loaded = []
        for name, versions in found.items():
            for version, path in sorted(versions.items()):
                began = time.perf_counter()
                try:
                    bundle = load_bundle(path)
                    if bundle.manifest.name != name:
                        raise BundleError(f"folder says model {name!r}, manifest says {bundle.manifest.name!r}")
                    runtime = self._runtime(bundle)
                except DeviceUnavailable:
                    raise
                except Exception as exc:  # a broken bundle must not take the others down
                    log.error("skipping bundle %s: %s", path, exc)
                    continue
                model = ModelVersion(bundle, runtime, load_seconds=time.perf_counter() - began)
                self.models.setdefault(name, {})[version] = model
                loaded.append(model)
                m = bundle.manifest
                log.info(
                    "loaded model %s v%d: %s %s %dx%d, %s %d -> %d, on %s",
                    name,
                    version,
                    m.kind,
                    m.cell,
                    m.layers,
                    m.hidden_size,
                    m.input_kind,
                    m.input_dim,
                    m.output_size,
                    runtime.provider,
                )
        if not loaded:
            raise BundleError(
                f"no servable model bundles under {self.models_dir} (expected <name>/<version>/manifest.json)"
            )
        return loaded

    def _runtime(self, bundle: Bundle) -> Runtime:
        try:
            return make_runtime(bundle, self.device, self.threads, self.initial_slots)
        except DeviceUnavailable as exc:
            if self.requested_device != "auto":
                raise
            log.warning("device auto: CUDA is not usable (%s); running on CPU", exc)
            self.device = "cpu"
            return make_runtime(bundle, "cpu", self.threads, self.initial_slots)

    def get(self, name: str, version: int = 0) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            serving = ", ".join(sorted(self.models)) or "none"
            raise not_found(Reason.MODEL_NOT_FOUND, f"no model named {name!r} (serving: {serving})", model=name)
        if not version:
            return versions[max(versions)]
        model = versions.get(version)
        if model is None:
            raise not_found(
                Reason.MODEL_NOT_FOUND,
                f"model {name!r} has no version {version} (versions: {', '.join(map(str, sorted(versions)))})",
                model=name,
                version=version,
            )
        return model

    def all(self) -> list[ModelVersion]:
        return [m for versions in self.models.values() for _, m in sorted(versions.items())]

    def describe(self) -> list[dict[str, Any]]:
        """Key facts of the latest version of each model (for ListModels)."""
        out = []
        for name in sorted(self.models):
            versions = self.models[name]
            m = versions[max(versions)].manifest
            out.append(
                dict(
                    name=name,
                    version=m.version,
                    versions=sorted(versions),
                    kind=m.kind,
                    cell=m.cell,
                    layers=m.layers,
                    hidden_size=m.hidden_size,
                    input_kind=m.input_kind,
                    input_dim=m.input_dim,
                    output_size=m.output_size,
                    labels=list(m.labels or []),
                    state_bytes_per_session=m.state_bytes_per_session(),
                    metrics_json=json.dumps(m.metrics, sort_keys=True),
                )
            )
        return out
