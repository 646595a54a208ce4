"""docker-compose.yml: valid against the Compose specification, and wired the way docs/operations.md says."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests import deploy_support as ds

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def compose():
    return ds.load_yaml(ds.COMPOSE_FILE)


def test_compose_file_matches_the_compose_specification_schema():
    checker = ds.tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed (pip install -e .[dev])")
    proc = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(ds.COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_schema_check_catches_a_broken_file(tmp_path):
    """The vendored schema really constrains services (so the check above can fail)."""
    checker = ds.tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed (pip install -e .[dev])")
    broken = tmp_path / "docker-compose.yml"
    text = ds.COMPOSE_FILE.read_text(encoding="utf-8").replace(
        "condition: service_completed_successfully", "condition: when_it_feels_like_it", 1
    )
    broken.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "when_it_feels_like_it" in proc.stdout + proc.stderr


def test_server_starts_only_after_the_export_job_succeeded(compose):
    services = compose["services"]
    for name in ("server", "server-gpu"):
        assert services[name]["depends_on"]["export"]["condition"] == "service_completed_successfully"
    export = services["export"]
    assert export["restart"] == "no"
    assert export["build"]["target"] == "export"
    # the job trains the default model unless it is already in the volume
    command = " ".join(export["command"])
    assert "seqserve export lm --out /models" in command
    assert "/models/docs-lstm/" in command


def test_export_job_checks_for_the_name_the_export_gives_the_default_model():
    """`seqserve export lm` names the bundle <corpus>-<cell>: the skip test must look for that name."""
    import argparse

    from seqserve.export import cli as export_cli

    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    args = parser.parse_args(["lm"])
    assert f"{args.corpus}-{args.cell}" == "docs-lstm"


def test_health_checks_run_the_grpc_probe_without_a_shell(compose):
    for name in ("server", "server-gpu"):
        check = compose["services"][name]["healthcheck"]
        assert check["test"][:3] == ["CMD", "seqserve", "health"]
        assert _seconds(check["timeout"]) < _seconds(check["interval"])
        assert _seconds(check["start_period"]) >= 30  # models load before SERVING


def test_stop_grace_exceeds_the_servers_drain_time(compose):
    for name in ("server", "server-gpu"):
        service = compose["services"][name]
        assert service["stop_signal"] == "SIGTERM"
        drain = float(service["environment"]["SEQSERVE_SHUTDOWN_GRACE_S"])
        assert _seconds(service["stop_grace_period"]) >= drain + 10


def test_gpu_profile(compose):
    services = compose["services"]
    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    assert (ds.ROOT / gpu["build"]["dockerfile"]).is_file()
    assert gpu["environment"]["SEQSERVE_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # everything else runs without a profile
    assert [name for name, s in services.items() if "profiles" in s] == ["server-gpu"]
    # the GPU server's host ports do not collide with the CPU server's
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))


def test_models_volume_is_written_by_export_and_read_only_for_servers(compose):
    services = compose["services"]
    assert "models" in compose["volumes"]
    assert "models:/models" in services["export"]["volumes"]
    for name in ("server", "server-gpu"):
        assert "models:/models:ro" in services[name]["volumes"]
        assert services[name]["environment"]["SEQSERVE_MODELS"] == "/models"


def test_ports_match_the_settings_and_prometheus_targets(compose):
    services = compose["services"]
    for name in ("server", "server-gpu"):
        env = services[name]["environment"]
        assert env["SEQSERVE_HOST"] == "0.0.0.0" and env["SEQSERVE_METRICS_HOST"] == "0.0.0.0"
        container_ports = {p.split(":")[1] for p in services[name]["ports"]}
        assert container_ports == {env["SEQSERVE_PORT"], env["SEQSERVE_METRICS_PORT"]}
    scrape = {job["job_name"]: job for job in ds.load_yaml(ds.PROMETHEUS_CONFIG)["scrape_configs"]}
    metrics_port = services["server"]["environment"]["SEQSERVE_METRICS_PORT"]
    assert scrape["seqserve"]["static_configs"][0]["targets"] == [f"server:{metrics_port}"]
    gpu_sd = scrape["seqserve-gpu"]["dns_sd_configs"][0]
    assert gpu_sd["names"] == ["server-gpu"]
    assert str(gpu_sd["port"]) == services["server-gpu"]["environment"]["SEQSERVE_METRICS_PORT"]
    datasource = ds.load_yaml(ds.GRAFANA_DATASOURCES)["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services


def test_settings_in_the_environment_are_real_server_settings(compose):
    import dataclasses

    from seqserve.server.config import ServerConfig

    known = {f.name for f in dataclasses.fields(ServerConfig)}
    # The metrics settings arrive with the metrics code; once they exist, this check is exact.
    pending = {"metrics_host", "metrics_port"} - known
    used = set()
    for name in ("server", "server-gpu"):
        used |= {key for key in compose["services"][name]["environment"]}
    used |= set(re.findall(r"\bSEQSERVE_([A-Z_]+)=", ds.DOCKERFILE.read_text(encoding="utf-8")))
    used |= set(re.findall(r"\bSEQSERVE_([A-Z_]+)=", ds.DOCKERFILE_GPU.read_text(encoding="utf-8")))
    settings = {key.removeprefix("SEQSERVE_").lower() for key in used}
    assert settings - known <= pending, settings - known - pending


def test_every_mounted_file_is_in_the_repository(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ds.ROOT / source).exists(), f"{name} mounts missing {source}"
    grafana_env = compose["services"]["grafana"]["environment"]
    home = grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    providers = ds.load_yaml(ds.GRAFANA_DASHBOARD_PROVIDERS)["providers"]
    assert home == providers[0]["options"]["path"] + "/" + ds.GRAFANA_DASHBOARD.name


def test_build_targets_exist_in_the_dockerfile(compose):
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", ds.DOCKERFILE.read_text(encoding="utf-8"), re.M | re.I))
    for name in ("export", "server"):
        assert compose["services"][name]["build"]["target"] in stages


def _seconds(value: str) -> float:
    """Compose durations used here: 30s, 1m, 1m30s."""
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(number) * units[unit]
    return total
