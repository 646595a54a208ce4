"""TLS and mutual TLS options, against the real server behind a TLS-terminating proxy.

The server speaks plaintext on loopback; an asyncio TLS endpoint (ALPN h2) in front of it checks the
client's certificate when asked to, so the SDK's root-certificate, client-certificate and
server-name options are exercised end to end. Certificates come from the openssl command.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from seqserve.client import Client, TlsConfig, Unavailable
from tests.client_support import run_cli, shared_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
SERVER_NAME = "seqserve.test"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd: Path, name: str, subject: str, san: str | None = None) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={subject}",
        cwd=cwd,
    )
    ext = cwd / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        str(ext),
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        cwd=d,
    )
    _issue(d, "server", SERVER_NAME, san=SERVER_NAME)
    _issue(d, "client", "test client")
    return d


class TlsTerminator:
    """TLS (h2) on a loopback port, forwarding the decrypted bytes to a plaintext port."""

    def __init__(self, upstream_port: int, certs: Path, require_client_cert: bool):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
        ctx.set_alpn_protocols(["h2"])
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(certs / "ca.pem")
        self._upstream_port = upstream_port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ctx,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        self.target = f"127.0.0.1:{self.port}"

    def _run(self, ctx: ssl.SSLContext) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self._upstream_port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(down_r, up_w), pump(up_r, down_w))

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


@pytest.fixture(scope="module")
def mtls(server, certs):
    t = TlsTerminator(server.port, certs, require_client_cert=True)
    yield t
    t.close()


def test_tls_with_root_certificates_and_server_name(server, certs):
    tls = TlsTerminator(server.port, certs, require_client_cert=False)
    try:
        config = TlsConfig(root_certificates=certs / "ca.pem", server_name_override=SERVER_NAME)
        with Client(tls.target, tls=config, timeout=20) as c, c.session("lm-rnn") as s:
            assert s.step("tls").position == 3
            gen = s.generate(max_tokens=4, seed=1)
            list(gen)
            assert len(gen.tokens) == 4 and s.position == 7
        # Without our CA the server's certificate is not trusted.
        with Client(tls.target, tls=TlsConfig(server_name_override=SERVER_NAME), max_retries=0, timeout=10) as c:
            with pytest.raises(Unavailable):
                c.models()
    finally:
        tls.close()


def test_mutual_tls(mtls, certs):
    both = TlsConfig(
        root_certificates=(certs / "ca.pem").read_bytes(),
        certificate_chain=str(certs / "client.pem"),
        private_key=(certs / "client.key").read_text(),
        server_name_override=SERVER_NAME,
    )
    with Client(mtls.target, tls=both, timeout=20) as c:
        assert {m.name for m in c.models()} >= {"lm-lstm", "feat-gru"}
    # The endpoint demands a client certificate: without one the handshake fails.
    server_only = TlsConfig(root_certificates=certs / "ca.pem", server_name_override=SERVER_NAME)
    with Client(mtls.target, tls=server_only, max_retries=0, timeout=10) as c, pytest.raises(Unavailable):
        c.models()


def test_cli_mutual_tls(mtls, certs):
    proc = run_cli(
        "--root-certs",
        str(certs / "ca.pem"),
        "--client-cert",
        str(certs / "client.pem"),
        "--client-key",
        str(certs / "client.key"),
        "--server-name",
        SERVER_NAME,
        "models",
        target=mtls.target,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lm-lstm" in proc.stdout
    proc = run_cli(
        "--retries",
        "0",
        "--root-certs",
        str(certs / "ca.pem"),
        "--server-name",
        SERVER_NAME,
        "models",
        target=mtls.target,
    )
    assert proc.returncode == 4 and "cannot reach server" in proc.stderr
