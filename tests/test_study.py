"""The long-range dependency study: its tasks, its pipeline (--quick), and its models served end to end."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from seqserve.export.model import RecurrentModel
from seqserve.export.study import QUICK, export_study_model, main, run_study_config
from seqserve.export.study_tasks import (
    ADDING_BASELINE_MSE,
    TaskSpec,
    adding_batch,
    copy_batch,
    gradient_by_distance,
    matched_hidden_sizes,
    model_config,
    task_loss,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_adding_batch_marks_one_value_in_each_half_and_sums_them():
    x, target = adding_batch(4000, 30, torch.Generator().manual_seed(1))
    values, markers = x[..., 0], x[..., 1]
    assert torch.all(markers.sum(dim=1) == 2)
    assert torch.all(markers[:, :15].sum(dim=1) == 1) and torch.all(markers[:, 15:].sum(dim=1) == 1)
    assert torch.allclose((values * markers).sum(dim=1), target)
    # Predicting the mean (1.0) scores the variance of a sum of two uniforms, 1/6.
    assert abs(float(((target - 1.0) ** 2).mean()) - ADDING_BASELINE_MSE) < 0.01


def test_copy_batch_layout():
    spec = TaskSpec(alphabet=5, symbols=3)
    tokens, letters = copy_batch(6, 12, spec, torch.Generator().manual_seed(2))
    blank, go = 5, 6
    assert torch.equal(tokens[:, :3], letters)
    assert torch.all(tokens[:, 12 - 3 - 1] == go)
    rest = torch.cat([tokens[:, 3:8], tokens[:, 9:]], dim=1)
    assert torch.all(rest == blank)
    with pytest.raises(ValueError, match="needs length >= 7"):
        copy_batch(2, 6, spec, torch.Generator())


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_hidden_sizes_match_parameter_counts_within_3_percent(task):
    sizes = matched_hidden_sizes(task, 32, TaskSpec())
    lstm = sizes["lstm"]["parameters"]
    for cell in ("rnn", "gru"):
        assert abs(sizes[cell]["parameters"] - lstm) / lstm < 0.03, sizes
    assert sizes["rnn"]["hidden"] > sizes["gru"]["hidden"] > sizes["lstm"]["hidden"]


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_gradient_probe_equals_per_sequence_autograd(task):
    spec = TaskSpec()
    torch.manual_seed(0)
    model = RecurrentModel(model_config(task, "rnn", 12, spec))
    x, y = (adding_batch if task == "adding" else lambda b, n, g: copy_batch(b, n, spec, g))(
        3, 9, torch.Generator().manual_seed(3)
    )
    probe = gradient_by_distance(task, model, x, y, spec)
    expected = torch.zeros(9)
    for row in range(3):  # one sequence at a time, the input of the recurrent layer made a leaf
        inputs = model.embed(x[row : row + 1]).detach().requires_grad_(True)
        out, _ = model.rnn(inputs, model.init_state(1)[0])
        task_loss(task, model.head(out), y[row : row + 1], spec, reduction="sum").backward()
        expected += inputs.grad[0].norm(dim=-1) / 3
    assert len(probe) == 9
    assert np.allclose(probe, expected.flip(0).numpy(), rtol=1e-5, atol=1e-9)


def test_quick_study_writes_table_json_and_plots(tmp_path):
    results = run_study_config(QUICK, tmp_path)
    lengths, cells = QUICK.lengths, QUICK.cells
    assert len(results["runs"]) == 2 * len(cells) * len(lengths) * len(QUICK.seeds)
    assert len(results["summary"]) == 2 * len(cells) * len(lengths)
    for row in results["summary"]:
        assert row["min"] <= row["mean"] <= row["max"]
        assert row["reference"] == (ADDING_BASELINE_MSE if row["task"] == "adding" else 1 / QUICK.task.alphabet)
    probes = results["gradient_probes"]
    assert {(p["task"], p["cell"]) for p in probes} == {(t, c) for t in ("adding", "copy") for c in cells}
    for probe in probes:
        assert probe["length"] == max(lengths)
        assert sorted(int(s) for s in probe["grad_by_distance"]) == [0, 2, 10, 20]
        assert all(len(v) == max(lengths) and min(v) >= 0 for v in probe["grad_by_distance"].values())
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["summary"] == results["summary"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(results["runs"])
    table = (tmp_path / "results.md").read_text()
    for task in ("adding", "copy"):
        for cell in cells:
            size = results["parameters"][task][cell]
            assert f"{cell} (h={size['hidden']}, {size['parameters']:,} params)" in table
    assert table.count("\n| 8 |") == 2 and table.count("\n| 12 |") == 2
    for name in ("study-metrics.png", "study-gradients.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_study_command_rejects_bad_settings_in_one_line(tmp_path, capsys):
    assert main(["--quick", "--lengths", "4,8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "at least 7" in err
    assert main(["--quick", "--cells", "rnn,transformer", "--out", str(tmp_path)]) == 2
    assert "cells must be" in capsys.readouterr().err
    assert main(["--quick", "--probe-length", "9", "--out", str(tmp_path)]) == 2
    assert "probe length 9" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------- served end to end


def _start_server(models_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seqserve",
            "serve",
            "--models",
            str(models_dir),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline, seen = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"listening on (\S+):(\d+)", line)
        if match:
            return proc, f"{match.group(1)}:{match.group(2)}"
    proc.kill()
    proc.wait()
    raise AssertionError("server did not start:\n" + "".join(seen[-20:]))


@pytest.mark.timeout(120)
def test_adding_models_streamed_step_by_step_match_pytorch(tmp_path):
    import grpc

    from seqserve.v1 import seqserve_pb2 as pb
    from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

    length = 200
    models = {
        cell: export_study_model(cell, length, tmp_path, seed=i)[1] for i, cell in enumerate(("rnn", "lstm", "gru"))
    }
    x, _ = adding_batch(1, length, torch.Generator().manual_seed(42))
    proc, address = _start_server(tmp_path)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
            for cell, model in models.items():
                info = listed[f"adding-{cell}"]
                assert (info.kind, info.cell, info.input_kind, info.input_dim, info.output_size) == (
                    "regressor",
                    cell,
                    "features",
                    2,
                    1,
                )
                with torch.no_grad():
                    expected, _ = model(x, model.init_state(1))
                session = stub.CreateSession(pb.CreateSessionRequest(model=f"adding-{cell}"), timeout=10)
                served = []
                for t in range(length):
                    result = stub.Step(
                        pb.StepRequest(
                            session_id=session.session_id,
                            expected_position=t,
                            features=x[0, t].numpy().astype("<f4").tobytes(),
                            output=pb.OutputSpec(logits=True),
                        ),
                        timeout=10,
                    )
                    assert (result.position, result.steps, result.width) == (t + 1, 1, 1)
                    served.append(np.frombuffer(result.logits, dtype="<f4")[0])
                diff = np.abs(np.array(served) - expected[0, :, 0].numpy())
                assert diff.max() < 1e-4, (
                    f"{cell}: server differs from PyTorch by {diff.max():.3g} (worst at step {diff.argmax()})"
                )
                # A regressor returns its raw output by default, and refuses distribution outputs.
                plain = stub.Step(
                    pb.StepRequest(session_id=session.session_id, features=x[0, 0].numpy().astype("<f4").tobytes()),
                    timeout=10,
                )
                assert len(plain.logits) == 4 and not plain.top_k_ids
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Step(
                        pb.StepRequest(
                            session_id=session.session_id,
                            features=x[0, 0].numpy().astype("<f4").tobytes(),
                            output=pb.OutputSpec(top_k=3),
                        ),
                        timeout=10,
                    )
                assert (
                    refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regressor" in refused.value.details()
                )
                stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=10)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
