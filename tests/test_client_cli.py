"""`seqserve client ...` run as a subprocess against a real server: output, chat over stdin, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seqserve.client import Client, decode_tokens
from tests.client_support import ClosedPort, run_cli, shared_server


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


def _one_line_error(proc, code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_models_table_json_and_env_target(server):
    proc = run_cli("models", target=server.target)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "VERSION", "VERSIONS", "KIND"]
    assert sorted(r.split()[0] for r in rows) == ["cls-lstm", "feat-gru", "lm-gru", "lm-lstm", "lm-rnn"]
    feat = next(r for r in rows if r.startswith("feat-gru")).split()
    assert feat[3:5] == ["classifier", "gru"] and "features[8]" in feat
    proc = run_cli("models", "--json", env={"SEQSERVE_TARGET": server.target})
    assert proc.returncode == 0, proc.stderr
    assert {m["name"]: m["input_dim"] for m in json.loads(proc.stdout)}["feat-gru"] == 8


def test_generate_matches_the_sdk(server):
    args = dict(max_tokens=25, temperature=0.9, top_k=50, top_p=0.95, seed=12)
    with Client(server.target) as c, c.session("lm-lstm") as s:
        expected = "".join(s.generate("Hello", **args))
    proc = run_cli(
        "generate",
        "lm-lstm",
        "Hello",
        "--max-tokens",
        "25",
        "--temperature",
        "0.9",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "12",
        target=server.target,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + ("" if expected.endswith("\n") else "\n")


def test_generate_stop_sequence(server):
    with Client(server.target) as c, c.session("lm-gru") as s:
        sampled = s.generate("abc", max_tokens=40, seed=3)
        list(sampled)
    tokens = sampled.tokens
    printable = [t for t in tokens[1:] if 32 <= t < 127]
    assert printable, f"the fixture model's output has no printable ASCII byte: {tokens}"
    stop = printable[0]
    expected = decode_tokens(tokens[: tokens.index(stop) + 1])
    proc = run_cli(
        "generate", "lm-gru", "abc", "--max-tokens", "40", "--seed", "3", "--stop", chr(stop), target=server.target
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_session_lifecycle_and_continue_generation(server):
    t = server.target
    created = run_cli("session", "create", "lm-gru", "--id", "cli-session", target=t)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "cli-session"
    proc = run_cli("generate", "lm-gru", "hi", "--session", "cli-session", "--max-tokens", "5", target=t)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("generate", "lm-gru", "", "--session", "cli-session", "--max-tokens", "3", target=t)
    assert proc.returncode == 0, proc.stderr
    got = run_cli("session", "get", "cli-session", "--json", target=t)
    assert got.returncode == 0 and json.loads(got.stdout)["position"] == 2 + 5 + 3
    assert "position: 10" in run_cli("session", "get", "cli-session", target=t).stdout
    reset = run_cli("session", "reset", "cli-session", target=t)
    assert reset.returncode == 0 and "position 0" in reset.stdout
    closed = run_cli("session", "close", "cli-session", target=t)
    assert closed.returncode == 0 and closed.stdout.strip() == "closed cli-session at position 0"
    _one_line_error(run_cli("session", "get", "cli-session", target=t), 3, "cli-session")
    created = run_cli("session", "create", "lm-rnn", "--json", target=t)
    assert created.returncode == 0, created.stderr
    sid = json.loads(created.stdout)["session_id"]
    closed = run_cli("session", "close", sid, target=t)
    assert closed.returncode == 0, (closed.stdout, closed.stderr)


def test_classify_text_and_frames(server, tmp_path):
    proc = run_cli("classify", "cls-lstm", "--text", "hello there", target=server.target)
    assert proc.returncode == 0, proc.stderr
    with Client(server.target) as c, c.session("cls-lstm") as s:
        expected = s.classify("hello there")
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [label for label, _ in expected.ranked()]
    assert float(rows[0][1]) == pytest.approx(expected.confidence, abs=1e-4)
    frames = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", frames)
    (tmp_path / "f.json").write_text(json.dumps(frames.tolist()))
    outs = [
        run_cli("classify", "feat-gru", "--frames", str(tmp_path / f), "--json", target=server.target)
        for f in ("f.npy", "f.json")
    ]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    a, b = (json.loads(o.stdout) for o in outs)
    assert a["label"] == b["label"] and a["position"] == 5
    assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)


def test_chat_over_stdin(server):
    lines = ["hello", "how are you?", "/quit", "never read"]
    proc = run_cli(
        "chat",
        "lm-lstm",
        "--max-tokens",
        "30",
        "--temperature",
        "0.7",
        "--seed",
        "5",
        stdin="\n".join(lines) + "\n",
        target=server.target,
    )
    assert proc.returncode == 0, proc.stderr
    with Client(server.target) as c, c.session("lm-lstm") as s:
        expected = []
        for i, line in enumerate(lines[:2]):
            reply = "".join(s.generate(line + "\n", max_tokens=30, temperature=0.7, seed=5 + i, stop="\n"))
            expected.append(reply if reply.endswith("\n") else reply + "\n")
    assert proc.stdout == "".join(expected)
    # End of input ends the chat too; a final line without newline is still answered.
    proc = run_cli("chat", "lm-gru", "--max-tokens", "8", stdin="one\ntwo", target=server.target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 2


def test_errors_are_one_line_with_exit_codes(server, tmp_path):
    t = server.target
    with ClosedPort() as closed:
        _one_line_error(
            run_cli("--retries", "0", "models", target=closed.target), 4, f"cannot reach server at {closed.target}"
        )
    _one_line_error(run_cli("generate", "no-such-model", "hi", target=t), 3, "no-such-model")
    _one_line_error(run_cli("session", "close", "never-existed", target=t), 3)
    _one_line_error(run_cli("classify", "feat-gru", "--text", "not frames", target=t), 5)
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), dtype=np.float32))
    _one_line_error(run_cli("classify", "feat-gru", "--frames", str(tmp_path / "bad.npy"), target=t), 5)
    (tmp_path / "bad.txt").write_text("1 2 3")
    _one_line_error(run_cli("classify", "feat-gru", "--frames", str(tmp_path / "bad.txt"), target=t), 5, ".npy")
    _one_line_error(run_cli("generate", "lm-gru", "x", "--top-p", "3", target=t), 5)
    _one_line_error(run_cli("generate", "lm-gru", "", target=t), 2, "prompt")
    _one_line_error(run_cli(target=t), 2, "choose a command")
    assert run_cli("generate", "lm-gru", target=t).returncode == 2  # argparse: missing prompt
