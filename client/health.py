"""``seqserve health``: ask a server's gRPC health service whether it is serving.

Made for container health checks (Docker's ``HEALTHCHECK``, compose's ``healthcheck``), which run a
command without a shell: exit 0 only when the answer is SERVING, 1 otherwise (not serving yet,
draining, unknown service, unreachable, too slow). Docker reserves exit code 2, so no probe
outcome uses it.

The standard ``grpc.health.v1`` messages are declared here, in a private descriptor pool, rather
than imported from ``grpcio-health-checking``: that package is versioned in lockstep with grpcio
and pins protobuf to a narrow range, and the client install (``pip install seqserve``) should not
carry it for two messages with one field each. A private pool also never collides with the server's
copy of the same ``.proto`` when both are loaded in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["add_arguments", "run", "check", "default_address", "HealthResult", "CHECK_METHOD"]

CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVING = "SERVING"
EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def _message_classes() -> tuple[Any, Any]:
    """HealthCheckRequest and HealthCheckResponse, as in grpc/health/v1/health.proto."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="seqserve_client_health.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


_Request, _Response = _message_classes()


class HealthResult:
    """The probe's outcome: ``status`` is the health service's answer (e.g. ``"SERVING"``) or, when no
    answer came, the gRPC code name (``"UNAVAILABLE"``, ``"DEADLINE_EXCEEDED"``, ...)."""

    def __init__(self, status: str, detail: str = ""):
        self.status = status
        self.detail = detail

    @property
    def serving(self) -> bool:
        return self.status == SERVING

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def default_address() -> str:
    """``127.0.0.1:$SEQSERVE_PORT``: the probe runs next to the server it checks, which reads the same
    variable for its port; 50051 (the server's default) when it is unset."""
    return f"127.0.0.1:{os.environ.get('SEQSERVE_PORT') or 50051}"


def check(address: str, service: str = "", timeout: float = 3.0) -> HealthResult:
    """One ``grpc.health.v1.Health/Check`` call on a plaintext channel to ``address``."""
    with grpc.insecure_channel(address) as channel:
        call: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
            CHECK_METHOD,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=_Response.FromString,
        )
        try:
            response = call(_Request(service=service), timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            # the blocking API raises an RpcError that is also a grpc.Call (code(), details())
            code_fn, details_fn = getattr(exc, "code", None), getattr(exc, "details", None)
            code = code_fn() if callable(code_fn) else None
            details = details_fn() if callable(details_fn) else str(exc)
            return HealthResult(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN", str(details or ""))
    status = _Response.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[response.status].name
    return HealthResult(str(status), "" if status == SERVING else f"service {service!r}")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``seqserve health``'s options."""
    parser.description = (
        "Ask a server's gRPC health service whether it is serving: exit 0 when SERVING, 1 otherwise. "
        "Made for container health checks."
    )
    parser.add_argument(
        "--address",
        default=None,
        help="server HOST:PORT (default 127.0.0.1:$SEQSERVE_PORT, or 127.0.0.1:50051 when it is unset)",
    )
    parser.add_argument(
        "--service",
        default="",
        help="service name to ask about, e.g. seqserve.v1.SeqServe (default: the whole server)",
    )
    parser.add_argument("--timeout", type=_positive_float, default=3.0, help="seconds to wait (default 3)")
    parser.add_argument("--quiet", action="store_true", help="print nothing; the exit code says it")


def run(args: argparse.Namespace) -> int:
    """Run ``seqserve health``; 0 when serving, else 1."""
    address = args.address or default_address()
    result = check(address, args.service, args.timeout)
    if not args.quiet:
        print(f"{address}: {result}", file=sys.stdout if result.serving else sys.stderr)
    return EXIT_SERVING if result.serving else EXIT_NOT_SERVING
