"""Connection settings of :class:`~seqserve.client.Client` / ``AsyncClient`` and how channels are built."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

__all__ = ["DEFAULT_TARGET", "TlsConfig", "ClientConfig", "default_target"]

DEFAULT_TARGET = "127.0.0.1:50051"
_USER_AGENT = "seqserve-python-client"


def default_target() -> str:
    """``$SEQSERVE_TARGET`` if set, else ``127.0.0.1:50051``."""
    return os.environ.get("SEQSERVE_TARGET") or DEFAULT_TARGET


def _pem(value: bytes | str | os.PathLike[str] | None, what: str) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    text = os.fspath(value)
    if "-----BEGIN" in text:
        return text.encode("ascii")
    path = Path(text)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} from {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel. Each PEM value may be bytes, PEM text, or a path to a PEM file.

    With no ``root_certificates`` the system's trust store is used. Give ``certificate_chain`` and
    ``private_key`` together for mutual TLS.
    """

    root_certificates: bytes | str | os.PathLike[str] | None = None  # CA bundle to trust; None: system roots
    certificate_chain: bytes | str | os.PathLike[str] | None = None  # client certificate, for mTLS
    private_key: bytes | str | os.PathLike[str] | None = None  # client key, for mTLS
    server_name_override: str | None = None  # name to check the server's certificate against (tests, IPs)

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials these settings describe."""
        chain = _pem(self.certificate_chain, "certificate chain")
        key = _pem(self.private_key, "private key")
        if (chain is None) != (key is None):
            raise ValueError("mutual TLS needs both a client certificate chain and its private key")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates, "root certificates"),
            private_key=key,
            certificate_chain=chain,
        )


@dataclass(frozen=True)
class ClientConfig:
    """Every knob of a client. Pass one to ``Client(target, config=...)`` or override fields by keyword."""

    timeout: float | None = 30.0  # deadline (s) of each unary call and step: a stuck server fails fast
    generate_timeout: float | None = 600.0  # deadline (s) of a whole Generate stream: long outputs take time
    stream_timeout: float | None = None  # deadline (s) of a multiplexed StepStream: None, it lives as long as used
    max_retries: int = 5  # resends after UNAVAILABLE / a dropped stream; steps stay exactly-once
    retry_backoff: float = 0.1  # first wait (s) before a resend, doubled each time (5 resends span ~3 s)
    retry_backoff_max: float = 2.0  # cap (s) on that wait
    reconnect_backoff_ms: int = 100  # gRPC's first reconnect delay (its default, 1 s, outlasts quick resends)
    token: str | None = None  # bearer token sent as "authorization: Bearer <token>" on every call
    tls: TlsConfig | None = None  # None: plaintext channel (loopback, trusted networks)
    max_message_bytes: int = 64 * 1024 * 1024  # all-position logits of long chunks exceed gRPC's 4 MiB default
    # Ping the connection this often to detect dead peers under long-lived streams. seqserve's
    # server accepts pings every 10 s; other gRPC servers by default answer pings faster than
    # every 5 min on an idle transport with GOAWAY "too_many_pings": raise this for those.
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000  # how long a ping may go unanswered before the connection is dropped
    max_step_tokens: int = 8192  # feed() splits longer prompts into steps this long: bounded message size
    stream_window: int = 256  # default in-flight bound of a multiplexed stream: backpressure, not buffering

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.max_step_tokens < 1 or self.stream_window < 1:
            raise ValueError("max_step_tokens and stream_window must be at least 1")
        for name in ("timeout", "generate_timeout", "stream_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")

    def with_overrides(self, **overrides: Any) -> "ClientConfig":
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel arguments: message size limits, keepalive, user agent, TLS name override."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", self.reconnect_backoff_ms),
            ("grpc.max_reconnect_backoff_ms", max(self.reconnect_backoff_ms, int(self.retry_backoff_max * 1000))),
            ("grpc.primary_user_agent", _USER_AGENT),
        ]
        if self.tls is not None and self.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        return options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call (the bearer token, when set)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before resend number ``attempt`` (0-based)."""
        return float(min(self.retry_backoff * 2.0**attempt, self.retry_backoff_max))


def resolve_tls(tls: TlsConfig | bool | None) -> TlsConfig | None:
    """``True`` means TLS with the system roots; ``False``/``None`` means plaintext."""
    if tls is True:
        return TlsConfig()
    if tls is False or tls is None:
        return None
    return tls


def sync_channel(target: str, config: ClientConfig) -> grpc.Channel:
    """A blocking-API channel to ``target`` with ``config``'s options and credentials."""
    if config.tls is not None:
        return grpc.secure_channel(target, config.tls.credentials(), options=config.channel_options())
    return grpc.insecure_channel(target, options=config.channel_options())


def aio_channel(target: str, config: ClientConfig) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` with ``config``'s options and credentials."""
    if config.tls is not None:
        return grpc.aio.secure_channel(target, config.tls.credentials(), options=config.channel_options())
    return grpc.aio.insecure_channel(target, options=config.channel_options())
