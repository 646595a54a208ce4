"""The server's building blocks on their own: settings, state slabs, output rendering, sampling."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest

from seqserve.server.api.app import ServerThread, StartError
from seqserve.server.config import ConfigError, ServerConfig, add_arguments, load_config
from seqserve.server.domain import OutputSpec
from seqserve.server.outputs import DEFAULT_PLAN, NONE_PLAN, default_plan, parse_output, top_k_rows
from seqserve.server.sampling import sample


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_settings_precedence_flag_env_file_default(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('models = "from-file"\nmax_batch = 7\nmax-wait-ms = 3.5\nport = 1111\nrun_in_thread = true\n')
    env = {"SEQSERVE_MAX_BATCH": "9", "SEQSERVE_PORT": "2222", "SEQSERVE_CONFIG": str(config)}
    got = load_config(parse_flags("--port", "3333"), env)
    assert got.port == 3333  # flag beats env and file
    assert got.max_batch == 9  # env beats file
    assert got.max_wait_ms == 3.5 and got.models == "from-file" and got.run_in_thread is True  # file beats default
    assert got.idle_ttl_s == ServerConfig().idle_ttl_s  # default
    assert load_config(parse_flags("--no-run-in-thread"), env).run_in_thread is False


@pytest.mark.parametrize(
    "env, flags, words",
    [
        ({"SEQSERVE_MAX_BATCH": "lots"}, (), "max_batch"),
        ({}, ("--max-batch", "-1"), "at least 0"),
        ({"SEQSERVE_WHEN_FULL": "panic"}, (), "evict, refuse"),
        ({}, ("--max-wait-ms", "nan"), "max_wait_ms"),
        ({"SEQSERVE_LOOP_CPU": "fastest"}, (), "loop_cpu: must be auto, none or a CPU number"),
        ({}, ("--prefill-nice", "20"), "prefill_nice: must be at most 19"),
        ({"SEQSERVE_PREFILL_NICE": "-1"}, (), "prefill_nice: must be at least 0"),
    ],
)
def test_bad_settings_name_the_setting(env, flags, words):
    with pytest.raises(ConfigError, match=words):
        load_config(parse_flags(*flags), env)


def test_unknown_key_in_config_file(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text("[server]\nmax_batches = 3\n")
    with pytest.raises(ConfigError, match="max_batches"):
        load_config(parse_flags("--config", str(config)), {})


def test_output_plans():
    assert parse_output(OutputSpec(), 256) is DEFAULT_PLAN
    assert parse_output(OutputSpec(none=True), 256) is NONE_PLAN
    assert parse_output(OutputSpec(argmax=True), 256).top_k == 0
    assert parse_output(OutputSpec(top_k=1000), 10).top_k == 10
    assert parse_output(OutputSpec(all_positions=True), 3).top_k == 3
    # no OutputSpec at all means the same as an empty one, top-k capped at the width too
    for width in (3, 5, 256):
        assert default_plan(False, width) == parse_output(OutputSpec(), width)


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("k", [1, 5, 17, 64])
def test_top_k_rows_match_a_full_sort(rows, k):
    logits = np.random.default_rng(rows * k).standard_normal((rows, 64)).astype(np.float32)
    ids, log_probs = top_k_rows(logits, k)
    expected = np.argsort(-logits, axis=1)[:, :k]
    assert np.array_equal(ids, expected)
    exact = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    assert np.allclose(log_probs, np.take_along_axis(exact, expected, axis=1), atol=1e-5)


def draw(logits_row, n=4000, temperature=1.0, top_k=0, top_p=0.0):
    rows = np.repeat(np.asarray(logits_row, np.float32)[None], n, axis=0)
    u = (np.arange(n) + 0.5) / n  # an even grid: frequencies follow the distribution exactly
    return sample(rows, np.full(n, temperature), np.full(n, top_k), np.full(n, top_p), u)


def test_sampling_follows_the_truncated_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    freq = np.bincount(draw(logits), minlength=4) / 4000
    assert np.allclose(freq, probs, atol=1e-3)
    assert set(draw(logits, top_k=2)) == {0, 1}
    assert np.allclose(np.bincount(draw(logits, top_k=2), minlength=4)[:2] / 4000, [0.625, 0.375], atol=1e-3)
    assert set(draw(logits, top_p=0.5)) == {0}  # the first id already holds half the mass
    assert set(draw(logits, top_p=0.6)) == {0, 1}
    assert set(draw(logits, temperature=0.0)) == {0}
    cold = np.bincount(draw(logits, temperature=0.25), minlength=4) / 4000
    assert cold[0] > 0.85


def test_sampling_rows_are_independent_of_their_batch():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    temps, top_k, top_p = (
        np.array([0, 1, 0.7, 1.3, 1, 0.5]),
        np.array([0, 5, 0, 10, 1, 0]),
        np.array([0, 0, 0.9, 0.5, 0, 1]),
    )
    u = rng.random(6)
    together = sample(logits, temps, top_k, top_p, u)
    alone = [
        sample(logits[i : i + 1], temps[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], u[i : i + 1])[0]
        for i in range(6)
    ]
    assert together.tolist() == alone
    assert together[0] == logits[0].argmax() and together[4] == logits[4].argmax()


def test_docs_settings_table_is_generated_from_the_dataclass():
    from pathlib import Path

    from seqserve.server.config import settings_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "server.md").read_text(encoding="utf-8")
    table = doc.split("<!-- settings-table:start -->\n", 1)[1].split("<!-- settings-table:end -->", 1)[0]
    assert table == settings_table(), "regenerate the table in docs/server.md from settings_table()"


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs a process allowed on 2 or more CPUs",
)
def test_loop_thread_is_pinned_and_the_model_thread_is_not(tiny_models):
    models_dir, _ = tiny_models
    everything = os.sched_getaffinity(0)
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0)) as srv:
        loop_cpus = srv.call(lambda: os.sched_getaffinity(0))
        scheduler = srv.call(lambda: srv.engine.scheduler(srv.engine.registry.get("lm-lstm")))
        model_thread_cpus = srv.call(lambda: scheduler._pool.submit(os.sched_getaffinity, 0)).result(timeout=10)
    assert len(loop_cpus) == 1 and loop_cpus <= everything
    assert model_thread_cpus == everything
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, loop_cpu="none")) as srv:
        assert srv.call(lambda: os.sched_getaffinity(0)) == everything
    unusable = max(everything) + 1
    with pytest.raises(StartError, match=f"CPU {unusable} is not one this process may use"):
        ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, loop_cpu=str(unusable))).start()


def test_max_batch_zero_picks_the_devices_default(tiny_models):
    from seqserve.server.placement import CPU_MAX_BATCH

    models_dir, _ = tiny_models
    for setting, expected in ((0, CPU_MAX_BATCH), (7, 7)):
        with ServerThread(
            ServerConfig(models=str(models_dir), port=0, metrics_port=0, device="cpu", max_batch=setting)
        ) as srv:
            assert srv.call(lambda: srv.engine.scheduler(srv.engine.registry.get("lm-lstm")).max_batch) == expected


def test_server_made_session_ids_follow_the_client_id_rule():
    """Unguessable, and like a client-chosen id they start with a letter or digit: an id starting
    with '-' (1 in 64 of plain token_urlsafe ids) would read as an option to `seqserve client`."""
    from seqserve.server.session_table import _ID_RE, new_session_id

    ids = [new_session_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(_ID_RE.match(i) and len(i) == 22 for i in ids)
