"""Language-model data: byte corpora read offline, a deterministic split, and BPTT batching.

Corpora are plain bytes (the model's vocabulary is the 256 byte values):

* ``docs``   the text of Python's bundled documentation topics (``pydoc_data.topics``), the values
             joined in sorted key order (about 466 KB);
* ``stdlib`` the standard library's own ``.py`` files (tests and site-packages left out) in sorted
             path order, whole files until ``STDLIB_CAP_BYTES`` is reached;
* a path     a UTF-8 text file, or a folder whose UTF-8 text files are joined in sorted path order.

Split: the last ``val_fraction`` of the bytes is held out for validation (a contiguous tail, the
same for every seed), so "validation" is text the model never saw, and compressors can be scored
on exactly the same held-out bytes given the same training bytes.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

BUILTIN_CORPORA = ("docs", "stdlib")
STDLIB_CAP_BYTES = 4_000_000  # a few MB: several passes fit a short budget; whole files only
MIN_CORPUS_BYTES = 1024  # below this there is nothing to learn or to validate on
VAL_FRACTION = 0.1


class DataError(ValueError):
    """The training data is missing, unreadable, of the wrong kind or too small (one-line message)."""


@dataclass
class Corpus:
    """Bytes to train a language model on, and where they came from (goes into the manifest)."""

    name: str  # "docs", "stdlib" or the file/folder name
    data: bytes
    source: str  # human-readable origin
    files: int = 1  # how many files were joined
    notes: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"corpus": self.name, "source": self.source, "files": self.files, "bytes": len(self.data), **self.notes}


def _docs_corpus() -> Corpus:
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    return Corpus(
        "docs",
        text.encode("utf-8"),
        "pydoc_data.topics.topics (values in sorted key order)",
        files=1,
        notes={"topics": len(topics)},
    )


def _stdlib_corpus(cap: int = STDLIB_CAP_BYTES) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    chunks, total = [], 0
    for path in paths:
        try:
            blob = path.read_bytes()
            blob.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if total + len(blob) > cap:
            break
        chunks.append(blob)
        total += len(blob)
    if not chunks:
        raise DataError(f"found no readable .py files under {root}")
    return Corpus(
        "stdlib",
        b"".join(chunks),
        f"standard library .py files in sorted path order, capped at {cap} bytes",
        files=len(chunks),
        notes={"cap_bytes": cap},
    )


def _read_text_file(path: Path) -> bytes:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    return blob


def _is_text(path: Path) -> bool:
    try:
        blob = path.read_bytes()
        blob.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\x00" not in blob


def _path_corpus(path: Path) -> Corpus:
    if path.is_file():
        return Corpus(path.name, _read_text_file(path), str(path))
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        texts = [p for p in files if _is_text(p)]
        if not texts:
            raise DataError(f"folder {path} holds no UTF-8 text files")
        return Corpus(
            path.name,
            b"".join(p.read_bytes() for p in texts),
            f"{path} ({len(texts)} text files in sorted order)",
            files=len(texts),
        )
    raise DataError(f"corpus {str(path)!r} is neither {' nor '.join(BUILTIN_CORPORA)} nor an existing file or folder")


def load_corpus(spec: str) -> Corpus:
    """Read a corpus by name (``docs``, ``stdlib``) or path; raise DataError if it is unusable."""
    if spec == "docs":
        corpus = _docs_corpus()
    elif spec == "stdlib":
        corpus = _stdlib_corpus()
    else:
        corpus = _path_corpus(Path(spec))
    if not corpus.data.strip():
        raise DataError(f"corpus {corpus.source} is empty")
    if len(corpus.data) < MIN_CORPUS_BYTES:
        raise DataError(f"corpus {corpus.source} has {len(corpus.data)} bytes; at least {MIN_CORPUS_BYTES} are needed")
    return corpus


def split_corpus(data: bytes, val_fraction: float = VAL_FRACTION) -> tuple[bytes, bytes]:
    """Training bytes and the held-out tail (the last ``val_fraction`` of the corpus)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    cut = len(data) - max(1, int(round(len(data) * val_fraction)))
    return data[:cut], data[cut:]


def to_tensor(data: bytes) -> torch.Tensor:
    """Bytes as an int64 tensor of token ids 0..255."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batchify(tokens: torch.Tensor, streams: int) -> torch.Tensor:
    """Cut a 1-D token tensor into ``streams`` contiguous rows ``[streams, length]`` (the tail that
    does not fill a row is dropped), so each row is read in order and state can flow between chunks."""
    length = tokens.numel() // streams
    if length < 2:
        raise DataError(f"{tokens.numel()} bytes cannot feed {streams} parallel streams; use a smaller batch size")
    return tokens[: streams * length].view(streams, length)


def chunks(rows: torch.Tensor, bptt: int):
    """Yield ``(inputs, targets)`` windows of at most ``bptt`` steps over batchified rows, in order."""
    total = rows.size(1) - 1
    for start in range(0, total, bptt):
        end = min(start + bptt, total)
        yield rows[:, start:end], rows[:, start + 1 : end + 1]
