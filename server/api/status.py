"""Engine errors as gRPC statuses, in the richer error model.

Every failed call carries, besides its status code and message, a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer holding one ``google.rpc.ErrorInfo``: domain ``seqserve``, the
error's stable reason and its metadata (grpcio-status builds the trailer). A step refused on a
StepStream carries the same reason and metadata in its StepResult's ``error``.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from seqserve.v1 import seqserve_pb2 as pb

from ..errors import ServeError

DOMAIN = "seqserve"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(err: ServeError) -> grpc.StatusCode:
    return _CODES[err.code.value]


def rich_status(err: ServeError) -> grpc.Status:
    """The call status for ``err``: code, message, and the ErrorInfo detail."""
    info = error_details_pb2.ErrorInfo(reason=err.reason.value, domain=DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=err.code.value, message=err.message, details=[detail]))


async def abort(context: grpc.aio.ServicerContext, err: ServeError) -> None:
    """End the call with ``err`` (raises, as ``context.abort`` does)."""
    status = rich_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


def error_message(err: ServeError) -> pb.Error:
    """``err`` as a StepResult's ``error`` field."""
    return pb.Error(code=err.code.value, message=err.message, reason=err.reason.value, metadata=err.metadata)
