"""Reading Halflife's rich errors: google.rpc.Status with BadRequest details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ServerTooOldError(RuntimeError):
    """The server answered without a field this client asked for: it
    predates it (upgrade the server), and its answer differs from the one
    asked for (ListEvents' newest_first: its events oldest first)."""


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call carries in its trailers, if any
    (sync and asyncio errors alike); None for an error that is no call's
    (a handler's `except Exception` may hand over any)."""
    trailers = getattr(error, "trailing_metadata", None)
    for key, value in (trailers() if callable(trailers) else None) or ():
        if key == _STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) pairs of the BadRequest detail of a failed call;
    empty when the error carries none."""
    status = rich_status(error)
    violations: list[tuple[str, str]] = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations
