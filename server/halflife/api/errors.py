"""gRPC errors as `google.rpc.Status`, with `BadRequest` field violations.

Servicer methods raise `ApiError`; the `translate_errors` decorator turns it
into a rich status, so every handler reports bad input the same way. Bytes
that do not parse as the request message become a `MalformedRequest` (see
`parse_leniently`), which `refuse_malformed` answers the same way.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
from typing import Awaitable, Callable, Iterable, TypeVar

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from halflife.api.wire import RefusedUnparsed, check_request
from halflife.deadlines import DeadlineExpiredError
from halflife.embedding.batcher import BatcherStoppedError, QueueFullError
from halflife.logs import RepeatedWarning
from halflife.storage.base import StoreDamagedError, StoreUnavailableError

log = logging.getLogger(__name__)
_store_unavailable = RepeatedWarning(log)  # a full disk fails every write until it has room again
_store_damaged = RepeatedWarning(log, level=logging.ERROR)  # its files deleted: every write fails until a restart

FieldViolation = tuple[str, str]  # (field path, e.g. "inputs[3]", description)


# The status travels in the trailers. A receiver with gRPC's default limits
# refuses trailers over 16 KiB always and, from 8 KiB, at random: 1,000
# NOT_FOUND events came to 18 KiB, and with 8 KiB of details to 8.3 KiB, and
# the caller saw RESOURCE_EXHAUSTED "received metadata size exceeds ... limit"
# instead. 6 KiB leaves room for the message and gRPC's own trailers.
MAX_DETAILS_BYTES = 6 * 1024


def _within_budget(violations: list[FieldViolation]) -> list[FieldViolation]:
    """The first violations whose encoding fits MAX_DETAILS_BYTES (at least one)."""
    used = 0
    for n, (field, description) in enumerate(violations):
        used += len(field.encode()) + len(description.encode()) + 8  # tags and lengths
        if used > MAX_DETAILS_BYTES and n:
            return violations[:n]
    return violations


class ApiError(Exception):
    """An error the caller should see, with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Iterable[FieldViolation] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = list(violations)

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            reported = _within_budget(self.violations)
            if len(reported) < len(self.violations):
                status.message += (f" ({len(self.violations)} violations; the details list the first "
                                   f"{len(reported)})")
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                    for field, description in reported
                ]
            )
            detail = any_pb2.Any()
            detail.Pack(bad_request)
            status.details.append(detail)
        return rpc_status.to_status(status)


def invalid_argument(violations: Iterable[FieldViolation], message: str | None = None) -> ApiError:
    violations = list(violations)
    if message is None:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        message = f"{first[0]}: {first[1]}{more}"
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, violations)


def not_found(message: str, violations: Iterable[FieldViolation] = ()) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, message, violations)


def resource_exhausted(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def aborted(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.ABORTED, message)


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


class MalformedRequest:
    """Stands in for a request whose bytes did not parse as its message type,
    or that was refused unparsed (`halflife.api.wire`).

    grpc.aio parses the request before the handler runs and answers a parse
    error with UNKNOWN (and an ERROR traceback in the log); handing the
    handler this instead lets `refuse_malformed` answer INVALID_ARGUMENT.
    """

    __slots__ = ("type_name", "reason")

    def __init__(self, type_name: str, reason: str):
        self.type_name = type_name  # the full proto name, e.g. "halflife.v1.EmbedRequest"
        self.reason = reason  # protobuf's words, e.g. "Wire format was corrupt"

    def to_error(self) -> ApiError:
        # No field can be named: the bytes never became a message.
        return invalid_argument(
            [("", f"is not a valid {self.type_name} message: {self.reason}")],
            message=f"the request is not a valid {self.type_name} message: {self.reason}",
        )


class Received:
    """What the request deserializer hands the handler chain: the request (a
    `MalformedRequest` where its bytes did not parse) and its size on the
    wire, which the server's `Admission` counts; `refuse_malformed` unwraps it."""

    __slots__ = ("request", "size")

    def __init__(self, request: message.Message | MalformedRequest, size: int):
        self.request = request
        self.size = size


def parse_leniently(message_class: type[message.Message], max_bytes: float = math.inf) -> Callable[[bytes], Received]:
    """A request deserializer that never raises: a `MalformedRequest` stands
    in for bytes that are no `message_class`, or more than `max_bytes`."""
    type_name = message_class.DESCRIPTOR.full_name
    # upb's reasons repeat the type name; the description already names it.
    prefix = f"Error parsing message with type '{type_name}': "

    def parse(data: bytes) -> Received:
        try:
            if len(data) > max_bytes:
                raise RefusedUnparsed(f"it is {len(data):,} bytes, over the {max_bytes:,} this service takes")
            check_request(data, message_class.DESCRIPTOR)
            return Received(message_class.FromString(data), len(data))
        except RefusedUnparsed as error:
            return Received(MalformedRequest(type_name, f"{error} (refused unparsed)"), len(data))
        # The pure-Python protobuf backend raises UnicodeDecodeError for a
        # string field with invalid UTF-8; upb raises DecodeError for everything.
        except (message.DecodeError, UnicodeDecodeError) as error:
            return Received(MalformedRequest(type_name, str(error).removeprefix(prefix)), len(data))

    return parse


def refuse_malformed(behavior: Callable, client_streaming: bool, server_streaming: bool) -> Callable:
    """An RPC handler (`behavior`, of the given kind) of what `parse_leniently`
    hands on (`Received`), behind a check that answers a `MalformedRequest`
    INVALID_ARGUMENT before it runs, without a traceback: the caller's fault,
    not ours. A stream's requests are checked as they arrive."""

    async def refuse(request: MalformedRequest, context: grpc.aio.ServicerContext) -> None:
        log.debug("malformed request to %s: %s", getattr(behavior, "__qualname__", behavior), request.reason)
        await context.abort_with_status(request.to_error().to_status())

    if client_streaming:  # both ways (reflection's): client streams with one answer are served nowhere
        if not server_streaming:
            raise TypeError(f"{behavior!r}: a client stream with one response is not supported here")

        async def checked(requests, context):
            async for received in requests:
                if isinstance(received.request, MalformedRequest):
                    await refuse(received.request, context)
                yield received.request

        async def stream_stream(requests, context):
            async for response in behavior(checked(requests, context), context):
                yield response
        return stream_stream

    if server_streaming and inspect.isasyncgenfunction(behavior):
        async def unary_stream(received, context):
            if isinstance(received.request, MalformedRequest):
                await refuse(received.request, context)
            async for response in behavior(received.request, context):
                yield response
        return unary_stream

    async def unary_request(received, context):  # a unary response, or a stream written with context.write
        if isinstance(received.request, MalformedRequest):
            await refuse(received.request, context)
        answer = behavior(received.request, context)
        del received
        return await answer
    return unary_request


Handler = TypeVar("Handler", bound=Callable[..., Awaitable])

# How long past its deadline a handler whose work was dropped for it waits for
# grpc to end the call (see translate_errors) before it answers itself.
DEADLINE_GRACE_S = 0.5


def translate_errors(handler: Handler) -> Handler:
    """Wraps an async servicer method: ApiError becomes its rich status
    (INVALID_ARGUMENT with BadRequest for bad input), a full embedding queue
    RESOURCE_EXHAUSTED, an expired deadline
    DEADLINE_EXCEEDED, a store that cannot write or read now (disk full, I/O
    error) or an embedding model that is not running UNAVAILABLE, a store
    whose files are damaged or gone DATA_LOSS; anything
    unexpected becomes INTERNAL (logged with its traceback), and the server
    keeps serving."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        # Every answer is sent after the `except` block, and as a status, not
        # the error: raised inside the block, the AbortError would chain the
        # error, whose traceback holds the handler's frame and so the request,
        # in a cycle that only the garbage collector frees (refused 8 MiB
        # requests held 450 MB each until it ran).
        at_deadline = False
        try:
            return await handler(self, request, context)
        except ApiError as error:
            status = error.to_status()
        except QueueFullError as error:
            status = resource_exhausted(f"{error}; retry with backoff").to_status()
        except DeadlineExpiredError:
            status = deadline_exceeded(
                "the deadline passed before the work was done; a write was not stored").to_status()
            at_deadline = True
        except BatcherStoppedError as error:
            status = unavailable(f"{error}; retry with backoff").to_status()
        except StoreUnavailableError as error:
            # The disk, not the caller or our code: one line in the log, no traceback, and not one a call.
            _store_unavailable.log("%s: store unavailable: %s", handler.__qualname__, error)
            status = unavailable(f"the store failed ({error}); retry with backoff").to_status()
        except StoreDamagedError as error:
            # Neither: its files are damaged or gone, and no retry helps (it was INTERNAL and a traceback a call).
            # Not a line a call either: files deleted under the server failed 100 writes with 100 ERRORs (a review).
            _store_damaged.log("%s: store damaged: %s", handler.__qualname__, error)
            status = ApiError(grpc.StatusCode.DATA_LOSS, f"the store is damaged: {error}").to_status()
        except (grpc.aio.AbortError, asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException:  # a Rust panic comes as pyo3's PanicException, no Exception: the call hung (a review)
            log.exception("unexpected error in %s", handler.__qualname__)
            status = ApiError(grpc.StatusCode.INTERNAL, "internal error; see the server log").to_status()
        if at_deadline:
            # The call's Deadline runs out with grpc's own: answering as grpc ends the call itself
            # fails in its core and logs an ERROR traceback (a stress test: 3 in ~2,000 such calls).
            # grpc cancels this handler at its deadline, so wait for that; answer only if it does not.
            remaining = context.time_remaining()
            if remaining is not None:
                await asyncio.sleep(max(0.0, remaining) + DEADLINE_GRACE_S)
        del request
        await context.abort_with_status(status)

    return wrapper  # type: ignore[return-value]

