"""``seqserve export`` end to end as a subprocess: bundles that load and pass parity, and
one-line errors (no traceback) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from seqserve.bundle import load_bundle

pytestmark = pytest.mark.timeout(240)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--layers", "1", "--hidden", "24", "--embedding", "8", "--threads", "1", "--quiet"]


def export(args, cwd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seqserve", "export", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_lm_export_writes_a_loadable_bundle(tmp_path):
    out = tmp_path / "models"
    result = export(
        ["lm", *TINY, "--steps", "15", "--epoch-chunks", "10", "--batch-size", "8", "--bptt", "32", "--out", str(out)],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(out / "docs-lstm" / "1")
    manifest = bundle.manifest
    assert manifest.kind == "lm" and manifest.cell == "lstm" and manifest.hidden_size == 24
    assert manifest.parity["passed"] is True
    assert (bundle.path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    metrics = manifest.metrics
    assert 0 < metrics["val_bits_per_byte"] < 8
    assert 1.5 < metrics["zlib_bits_per_byte"] < 2.5 and metrics["xz_bits_per_byte"] < metrics["zlib_bits_per_byte"]
    assert metrics["epochs"] == 2 and metrics["params"] > 0 and metrics["train_seconds"] > 0  # 10 + a validated 5
    assert metrics["steps"] == 15 and metrics["stopped_by"] == "steps" and manifest.data["training"]["steps"] == 15
    assert manifest.data["corpus"] == "docs" and manifest.data["seed"] == 0
    assert manifest.data["train_bytes"] + manifest.data["val_bytes"] == manifest.data["bytes"]
    history = json.loads((bundle.path / "history.json").read_text(encoding="utf-8"))
    assert len(history["val"]) == 2
    assert f"wrote {out / 'docs-lstm' / '1'}" in result.stdout and "bits/byte" in result.stdout
    assert "after 15 steps, 2 epochs" in result.stdout


def test_lm_export_from_a_user_file_with_a_time_budget(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    result = export(
        [
            "lm",
            "--corpus",
            str(corpus),
            "--cell",
            "gru",
            *TINY[:-1],
            "--minutes",
            "0.05",
            "--batch-size",
            "4",
            "--bptt",
            "16",
            "--out",
            "m",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "bits/byte" in result.stderr  # live progress goes to stderr
    manifest = load_bundle(tmp_path / "m" / "notes-gru" / "1").manifest
    assert manifest.cell == "gru" and manifest.data["corpus"] == "notes.txt"
    assert manifest.metrics["stopped_by"] == "time"


def test_classifier_export_on_digits(tmp_path):
    result = export(["classifier", *TINY, "--epochs", "3", "--out", "models"], tmp_path)
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(tmp_path / "models" / "digits-gru" / "1")
    manifest = bundle.manifest
    assert manifest.kind == "classifier" and manifest.input_kind == "features" and manifest.input_dim == 8
    assert manifest.labels == [str(i) for i in range(10)]
    assert manifest.metrics["val_accuracy"] > manifest.metrics["chance_accuracy"]
    assert manifest.parity["passed"] is True
    assert (bundle.path / "curves.png").read_bytes().startswith(PNG_MAGIC)


def _jsonl(path, rows, raw=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return str(path)


GOOD_ROWS = [{"text": f"sample {i}", "label": "even" if i % 2 == 0 else "odd"} for i in range(20)]


def _error_cases(tmp_path):
    """The bad inputs checked end to end in a subprocess: (arguments, words the message must hold)."""
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    train = _jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    return {
        "empty corpus": (["lm", "--corpus", str(empty)], "is empty"),
        "missing corpus": (["lm", "--corpus", str(tmp_path / "nowhere.txt")], "neither docs nor stdlib"),
        "negative hidden": (["lm", "--hidden", "-5"], "hidden size must be at least 1, got -5"),
        "non-utf8 jsonl": (
            ["classifier", "--data", _jsonl(tmp_path / "latin.jsonl", GOOD_ROWS, b'{"text": "caf\xe9"}\n')],
            "line 21 is not UTF-8",
        ),
        "unknown label": (
            [
                "classifier",
                "--data",
                train,
                "--val-data",
                _jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "prime"}]),
            ],
            "unknown label 'prime'",
        ),
    }


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Every subprocess case, started together (each is mostly interpreter and torch start-up)."""
    tmp_path = tmp_path_factory.mktemp("errors")
    cases = _error_cases(tmp_path)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "seqserve", "export", *args, "--out", str(tmp_path / "out")],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=200)
        results[name] = (proc.returncode, stderr, cases[name][1])
    yield results, tmp_path / "out"


@pytest.mark.parametrize(
    "case", ["empty corpus", "missing corpus", "negative hidden", "non-utf8 jsonl", "unknown label"]
)
def test_bad_input_is_one_line_and_nonzero(error_runs, case):
    results, out = error_runs
    returncode, stderr, expected = results[case]
    assert returncode != 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("seqserve: error: ") and expected in lines[0], lines[0]
    assert not out.exists() or not any(out.rglob("manifest.json"))  # nothing half-written


@pytest.mark.parametrize(
    "args, expected",
    [
        (["lm", "--dropout", "1.0"], "dropout must be in [0, 1)"),
        (["lm", "--minutes", "0"], "minutes must be positive"),
        (["lm", "--steps", "0"], "steps must be at least 1"),
        (["lm", "--lr", "-1"], "learning rate must be positive"),
        (["lm", "--bptt", "0"], "bptt must be at least 1"),
        (["classifier", "--epochs", "0"], "epochs must be at least 1"),
        (["classifier", "--layers", "0"], "layers must be at least 1"),
        (["classifier", "--data", "absent.jsonl"], "does not exist"),
        (["classifier", "--val-data", "v.jsonl"], "--val-data is only for JSONL data"),
    ],
)
def test_bad_hyperparameters_in_process(tmp_path, monkeypatch, capsys, args, expected):
    from seqserve.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", *args, "--out", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("seqserve: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_help_on_each_task(tmp_path, capsys):
    from seqserve.cli import main

    result = export(["lm", "--help"], tmp_path, timeout=60)
    assert result.returncode == 0 and "--corpus" in result.stdout and "--minutes" in result.stdout
    assert "--steps" in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "classifier", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--data" in out and "--early-weight" in out and "--epochs" in out
