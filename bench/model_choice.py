"""Which model the benchmark serves: a named one, the LM under ``models/``, or a random stand-in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seqserve.bundle import Bundle, BundleError, discover, load_bundle

DEFAULT_MODELS_DIR = Path("models")
DEFAULT_LM_NAME = "docs-lstm"  # what `seqserve export lm` names its bundle by default
# The stand-in when no exported LM exists: a byte LM of the size the serving targets were set for.
STAND_IN = dict(cell="lstm", layers=2, hidden_size=512, embedding_size=128, input_dim=256, output_size=256)
# The smoke test's model: small enough that every measurement is fast.
TINY = dict(cell="lstm", layers=2, hidden_size=32, embedding_size=16, input_dim=256, output_size=256)


@dataclass
class ChosenModel:
    """The bundle to benchmark and a models folder that serves only it."""

    bundle: Bundle
    serve_root: Path  # a folder holding only this model (a link to its folder), for `seqserve serve --models`
    note: str  # one line saying where the model came from

    @property
    def name(self) -> str:
        return self.bundle.manifest.name


def _latest(versions: dict[int, Path]) -> Bundle:
    return load_bundle(versions[max(versions)])


def _pick_lm(root: Path, name: str | None) -> Bundle | None:
    found = discover(root)
    if name is not None:
        if name not in found:
            raise BundleError(f"model {name!r} not found under {root} (found: {', '.join(sorted(found)) or 'none'})")
        bundle = _latest(found[name])
        if bundle.manifest.kind != "lm" or bundle.manifest.input_kind != "tokens":
            raise BundleError(
                f"model {name!r} is a {bundle.manifest.kind} on {bundle.manifest.input_kind}; "
                "the benchmark needs a token language model"
            )
        return bundle
    lms = []
    for versions in found.values():
        try:
            bundle = _latest(versions)
        except BundleError:
            continue
        if bundle.manifest.kind == "lm" and bundle.manifest.input_kind == "tokens":
            lms.append(bundle)
    # The default export if it is there; otherwise the most recently exported LM.
    preferred = [b for b in lms if b.manifest.name == DEFAULT_LM_NAME]
    return (preferred or sorted(lms, key=lambda b: b.manifest.created))[-1] if lms else None


def export_random(root: Path, name: str, shape: dict) -> Bundle:
    """Export a seeded random-weight LM of ``shape`` as a bundle under ``root``."""
    import torch

    from seqserve.export.model import ModelConfig, RecurrentModel
    from seqserve.export.package import write_bundle

    torch.manual_seed(0)
    cfg = ModelConfig(
        cell=shape["cell"],
        input_kind="tokens",
        input_dim=shape["input_dim"],
        embedding_size=shape["embedding_size"],
        hidden_size=shape["hidden_size"],
        layers=shape["layers"],
        dropout=0.0,
        output_size=shape["output_size"],
    )
    model = RecurrentModel(cfg).eval()
    return write_bundle(model, root, name, "lm", data={"description": "random weights (benchmark stand-in)"})


def _serve_root_for(bundle: Bundle, scratch: Path) -> Path:
    """A folder whose only model is ``bundle``'s, so the server loads nothing else."""
    model_folder = bundle.path.parent
    root = scratch / "serve-models"
    root.mkdir(parents=True, exist_ok=True)
    link = root / bundle.manifest.name
    if not link.exists():
        link.symlink_to(model_folder.resolve(), target_is_directory=True)
    return root


def choose_model(model_dir: Path | None, model_name: str | None, quick: bool, scratch: Path) -> ChosenModel:
    """Resolve the command-line choice to a bundle; export a random stand-in when there is none."""
    if model_dir is not None:
        bundle = _pick_lm(model_dir, model_name)
        if bundle is None:
            raise BundleError(f"no token language model under {model_dir}")
        note = f"model {bundle.manifest.name} v{bundle.manifest.version} from {model_dir}"
    elif quick:
        bundle = export_random(scratch / "exported", "bench-tiny", TINY)
        note = "tiny random-weight LSTM (quick mode): figures exercise the harness, they mean nothing"
    else:
        bundle = _pick_lm(DEFAULT_MODELS_DIR, model_name) if DEFAULT_MODELS_DIR.is_dir() else None
        if bundle is not None:
            note = f"model {bundle.manifest.name} v{bundle.manifest.version} from {DEFAULT_MODELS_DIR}/"
        elif model_name is not None:
            raise BundleError(f"model {model_name!r} not found: {DEFAULT_MODELS_DIR}/ does not exist (use --model-dir)")
        else:
            bundle = export_random(scratch / "exported", "bench-random-lm", STAND_IN)
            note = (
                "no exported LM under models/: benchmarking a random-weight stand-in "
                "(LSTM 2x512, embedding 128, vocabulary 256)"
            )
    return ChosenModel(bundle, _serve_root_for(bundle, scratch), note)
