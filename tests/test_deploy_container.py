"""The server image for real: built by podman from the repository's Dockerfile, run with a model
mounted, answering gRPC and its health check, and stopping cleanly on SIGTERM.

No registry is reachable here, so the base image is a Debian root filesystem made with debootstrap
(the host's release, so the wheels built on the host fit its Python), and the build installs wheels
built on the host with --no-index (the package index is not reachable from inside a build either).
Everything lives in a private podman storage under the test's temporary folder and is removed after.
Needs root, podman, runc and debootstrap on a Debian host (scripts/setup.sh installs them as root);
about two minutes, most of it debootstrap. SEQSERVE_SKIP_CONTAINER_TEST=1 skips it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests import deploy_support as ds

IMAGE = "localhost/seqserve-test:server"
BASE = "localhost/seqserve-test:base"
MODEL = "lm-tiny"
# crun, Debian's default runtime, refuses hosts with hybrid cgroups; runc works everywhere. Containers
# may not raise their file and process limits above a sandbox's, so they get explicit ones.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
# What the build context needs: the package sources and metadata (.dockerignore trims the rest).
CONTEXT = ("pyproject.toml", "README.md", "Dockerfile", ".dockerignore", "seqserve", "server", "client", "export")
CONTEXT_DIRS = ("bench", "proto")


def _why_not() -> str | None:
    if os.environ.get("SEQSERVE_SKIP_CONTAINER_TEST") == "1":
        return "SEQSERVE_SKIP_CONTAINER_TEST=1"
    if platform.system() != "Linux" or os.geteuid() != 0:
        return "needs root on Linux (podman storage, debootstrap)"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install podman runc debootstrap)"
    if _os_release().get("ID") != "debian" or not _os_release().get("VERSION_CODENAME"):
        return "needs a Debian host: the base image is debootstrapped from the host's own release"
    return None


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return {}
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in text.splitlines()) if k}


pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(_why_not() is not None, reason=f"container test: {_why_not()}"),
]


def _mirror() -> str:
    """The host's Debian mirror (from its apt sources), so debootstrap fetches from where apt does."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        found = re.search(r"^URIs:\s*(\S+)", sources.read_text(encoding="utf-8"), re.M)
        if found:
            return found.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        found = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+\s+main", listing.read_text(encoding="utf-8"), re.M)
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


class Podman:
    """podman on a private storage root, with the test's containers.conf."""

    def __init__(self, work: Path):
        self.work = work
        conf = work / "containers.conf"
        conf.write_text(CONTAINERS_CONF, encoding="utf-8")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.prefix = ["podman", "--root", str(work / "storage"), "--runroot", str(work / "run")]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=timeout, env=self.env, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*self.prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )


def _timed(timings: dict[str, float], name: str, fn, *args, **kw):
    start = time.monotonic()
    try:
        return fn(*args, **kw)
    finally:
        timings[name] = time.monotonic() - start


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The server image in a private podman storage: (podman, timings in seconds)."""
    work = tmp_path_factory.mktemp("container")
    podman = Podman(work)
    timings: dict[str, float] = {}
    try:
        root = work / "rootfs"
        _timed(
            timings,
            "debootstrap",
            subprocess.run,
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                _os_release()["VERSION_CODENAME"],
                str(root),
                _mirror(),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        _timed(timings, "import", podman, "import", "-q", "-", BASE, stdin=tar.stdout, timeout=300)
        tar.wait(timeout=60)
        shutil.rmtree(root)
        image_python = podman(
            "run",
            "--rm",
            "--network",
            "host",
            BASE,
            "python3",
            "-c",
            "import sys; print(sys.version_info[:2])",
            check=False,
        )
        if image_python.returncode != 0:  # the host cannot run containers at all: not the image's fault
            pytest.skip(f"podman cannot run a container on this host: {image_python.stderr.strip()[-300:]}")
        if image_python.stdout.strip() != str(tuple(sys.version_info[:2])):
            pytest.skip(
                f"the host's Debian Python {image_python.stdout.strip()} differs from this interpreter's; "
                "the wheels built here would not fit the image"
            )

        context = work / "context"
        context.mkdir()
        for name in CONTEXT + CONTEXT_DIRS:
            source = ds.ROOT / name
            if source.is_dir():
                shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, context / name)
        _timed(
            timings,
            "wheels",
            subprocess.run,
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "-w",
                str(context / "wheelhouse"),
                f"{ds.ROOT}[server]",
                "setuptools",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        _timed(
            timings,
            "build",
            podman,
            "build",
            "--format", "docker",  # the OCI format has no HEALTHCHECK
            "--network", "none",  # everything the build installs comes from the wheelhouse
            "--target", "server",
            "--build-arg", f"BASE={BASE}",
            "--build-arg", "PIP_OPTIONS=--no-index --find-links /src/wheelhouse",
            "--tag", IMAGE,
            str(context),
            timeout=600,
        )  # fmt: skip
        yield podman, timings
    finally:
        podman("rm", "--all", "--force", check=False, timeout=120)
        podman("rmi", "--all", "--force", check=False, timeout=120)
        print("container test timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def models(tmp_path):
    """One small model, readable by the image's non-root user."""
    from tests.conftest import make_tiny_bundle

    root = tmp_path / "models"
    make_tiny_bundle(root, MODEL, hidden=16, layers=1)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def _wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    """Read ``podman logs -f`` until a line matches (or the log ends); return the lines read."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found.is_set(), f"no line matching {pattern!r} within {timeout}s:\n{''.join(lines)}"
    return lines


def test_server_image_serves_checks_health_and_stops_on_sigterm(built, models):
    from seqserve.client import Client
    from seqserve.client.health import check

    podman, _ = built
    port, metrics_port = _free_port(), _free_port()
    name = f"seqserve-test-{port}"
    podman(
        "run", "--detach", "--name", name, "--network", "host",
        "--volume", f"{models}:/models:ro",
        "--env", f"SEQSERVE_PORT={port}",
        "--env", f"SEQSERVE_METRICS_PORT={metrics_port}",
        IMAGE,
    )  # fmt: skip
    logs = podman.popen("logs", "--follow", name)
    try:
        lines = _wait_for_line(logs, r"listening on 0\.0\.0\.0:\d+", timeout=90)
        assert f"loaded model {MODEL} v1" in "".join(lines)
        target = f"127.0.0.1:{port}"

        # the image runs the server itself as PID 1, as the non-root user
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        pid1 = podman("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert pid1[1:3] == ["/opt/venv/bin/seqserve", "serve"], pid1

        # real gRPC calls through the host's loopback
        with Client(target) as client, client.session(MODEL) as session:
            assert [m.name for m in client.models()] == [MODEL]
            pieces = list(session.generate("hi", max_tokens=4, seed=1))
            assert pieces and session.position == 2 + 4
        assert check(target).serving

        # the image's own HEALTHCHECK, run by podman inside the container
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        state = podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
        assert state == "healthy"

        # the metrics port the image opens, on the address the image sets
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert "seqserve_serving 1.0" in response.read().decode()

        # SIGTERM reaches the server, which drains and exits 0 well before podman's SIGKILL
        start = time.monotonic()
        podman("stop", "--time", "30", name, timeout=60)
        stopped_after = time.monotonic() - start
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        assert stopped_after < 25
        log = podman("logs", name).stdout + podman("logs", name).stderr
        assert "shutting down" in log
    finally:
        logs.kill()
        logs.wait(timeout=10)
        podman("rm", "--force", name, check=False)
