"""Bytes that are not a valid request message, sent to every API RPC, get
INVALID_ARGUMENT with a BadRequest detail, and the server keeps serving.

grpc.aio parses a request before any handler runs; without the lenient parser
the server registers (halflife.api.server.add_service), such bytes got
UNKNOWN, a message naming Python classes, and an ERROR traceback in the log.
The methods come from the service descriptors, so a new RPC is covered as
soon as it is served; grpc's own health and reflection services are
registered, and covered, the same way.
"""

from __future__ import annotations

import importlib
import logging

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from halflife.api.server import API_SERVICES, HEALTH_SERVICE, REFLECTION_SERVICE
from halflife.v1 import embedding_pb2

API_METHODS: list[MethodDescriptor] = [method for service, _ in API_SERVICES for method in service.methods]

# Corrupt in the same way for every message type.
CORRUPT_PAYLOADS = {
    "garbage": b"\xff\xff\xff\xff\xff",  # a varint tag that never ends
    "cut-off varint": b"\x10",  # field 2, varint, and then nothing
    "wire type 7": b"\x0f",  # field 1 with a wire type that does not exist
    "over-long length": b"\x0a\x7f",  # field 1, 127 bytes announced, none sent
    "huge length": b"\x0a\xff\xff\xff\xff\x0f",  # field 1, ~4 GiB announced
}
BAD_UTF8 = b"\xc3\x28"  # a lead byte without its continuation byte


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def with_bad_utf8(message: Descriptor, depth: int = 3) -> bytes | None:
    """`message` encoded with invalid UTF-8 in its first string field,
    looking into sub-messages too; None when it has no string field."""
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return length_delimited(field.number, BAD_UTF8)
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and depth > 0:
            inner = with_bad_utf8(field.message_type, depth - 1)
            if inner is not None:
                return length_delimited(field.number, inner)
    return None


def payloads(method: MethodDescriptor) -> dict[str, bytes]:
    bad_utf8 = with_bad_utf8(method.input_type)
    return {**CORRUPT_PAYLOADS, **({"invalid UTF-8": bad_utf8} if bad_utf8 is not None else {})}


def call_raw(channel: grpc.Channel, method: MethodDescriptor, payload: bytes) -> bytes:
    # No serializers: the bytes go out, and come back, as they are.
    return channel.unary_unary(path(method), request_serializer=None, response_deserializer=None)(payload, timeout=30)


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest:
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    (detail,) = status.details
    unpacked = error_details_pb2.BadRequest()
    assert detail.Unpack(unpacked), f"the detail is a {detail.type_url}, not a BadRequest"
    return unpacked


def assert_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    info = embedding_pb2.GetModelInfoResponse.FromString(
        call_raw(channel, embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name["GetModelInfo"],
                 embedding_pb2.GetModelInfoRequest().SerializeToString())
    )
    assert info.dimension == 384


def test_every_api_rpc_is_covered():
    # A sanity check on the iteration itself: all four services, none empty.
    services = {method.containing_service.full_name for method in API_METHODS}
    assert services == {
        "halflife.v1.EmbeddingService", "halflife.v1.CatalogService",
        "halflife.v1.InterestService", "halflife.v1.RecommendService",
    }
    assert "/halflife.v1.EmbeddingService/Embed" in map(path, API_METHODS)


@pytest.mark.parametrize("method", API_METHODS, ids=path)
def test_malformed_request_is_invalid_argument_with_a_bad_request(channel, method, caplog):
    type_name = method.input_type.full_name
    with caplog.at_level(logging.DEBUG):
        for kind, payload in payloads(method).items():
            with pytest.raises(grpc.RpcError) as caught:
                call_raw(channel, method, payload)
            error = caught.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, error.code(), error.details())
            assert type_name in error.details()
            # Nothing of the server's Python shows through.
            assert "class" not in error.details() and "DecodeError" not in error.details(), error.details()
            (violation,) = bad_request(error).field_violations
            assert violation.field == ""  # the bytes never became a message: no field to name
            assert violation.description.startswith(f"is not a valid {type_name} message: "), violation.description
    # The caller's mistake is not the server's error: no ERROR line, no traceback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    assert_serving(channel)


def test_bad_utf8_is_reported_as_such(channel):
    embed = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name["Embed"]
    with pytest.raises(grpc.RpcError) as caught:
        call_raw(channel, embed, length_delimited(1, BAD_UTF8))
    (violation,) = bad_request(caught.value).field_violations
    assert "UTF-8" in violation.description


def test_an_empty_message_is_parsed_and_validated_as_usual(channel):
    # b"" is a valid EmbedRequest (all defaults): it reaches the handler, whose
    # own validation names the field.
    embed = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name["Embed"]
    with pytest.raises(grpc.RpcError) as caught:
        call_raw(channel, embed, b"")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(caught.value).field_violations] == ["inputs"]


def test_valid_requests_round_trip_through_the_registration(channel):
    embed = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name["Embed"]
    request = embedding_pb2.EmbedRequest(inputs=["still parsed", "and answered"])
    response = embedding_pb2.EmbedResponse.FromString(call_raw(channel, embed, request.SerializeToString()))
    assert [len(e.values) for e in response.embeddings] == [384, 384]
    assert all(e.token_count > 0 for e in response.embeddings)
    assert_serving(channel)


def generated_class(message: Descriptor) -> type:
    """The class protoc generated for `message`, from its _pb2 module."""
    module = importlib.import_module(message.file.name.removesuffix(".proto").replace("/", ".") + "_pb2")
    found = module
    for part in message.full_name.removeprefix(message.file.package + ".").split("."):
        found = getattr(found, part)
    return found


@pytest.mark.parametrize("method", API_METHODS, ids=path)
def test_registration_uses_the_generated_message_classes(method):
    # The servicers build and check the generated classes; the serializer the
    # server registers is the response class's SerializeToString.
    for message in (method.input_type, method.output_type):
        assert message_factory.GetMessageClass(message) is generated_class(message)
    assert not method.client_streaming and not method.server_streaming


GRPC_METHODS = [HEALTH_SERVICE.methods_by_name["Check"], HEALTH_SERVICE.methods_by_name["Watch"],
                REFLECTION_SERVICE.methods_by_name["ServerReflectionInfo"]]


@pytest.mark.parametrize("method", GRPC_METHODS, ids=path)
def test_grpcs_own_services_refuse_malformed_bytes_the_same_way(channel, method, caplog):
    """Health (unary and server-streaming) and reflection (streaming both ways)."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, True): channel.stream_stream}[method.client_streaming, method.server_streaming]
    call = kind(path(method), request_serializer=None, response_deserializer=None)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(grpc.RpcError) as caught:
            request = iter([CORRUPT_PAYLOADS["garbage"]]) if method.client_streaming else CORRUPT_PAYLOADS["garbage"]
            response = call(request, timeout=30)
            list(response) if method.server_streaming else response
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        (violation,) = bad_request(caught.value).field_violations
        assert violation.description.startswith(f"is not a valid {method.input_type.full_name} message: ")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    assert_serving(channel)


@pytest.mark.parametrize("method", GRPC_METHODS, ids=path)
def test_grpcs_own_services_refuse_a_request_past_a_name_unparsed(channel, method):
    """A Watch of a 40 MiB service name held ~200 MiB while open, uncounted
    (an audit): a request to health or reflection names something, and one
    past MAX_NAME_REQUEST_BYTES is INVALID_ARGUMENT; one within it is read."""
    from halflife.api.server import MAX_NAME_REQUEST_BYTES

    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, True): channel.stream_stream}[method.client_streaming, method.server_streaming]
    call = kind(path(method), request_serializer=None, response_deserializer=None)

    def named(length: int) -> bytes:
        if method.client_streaming:
            return reflection_pb2.ServerReflectionRequest(file_by_filename="x" * length).SerializeToString()
        return health_pb2.HealthCheckRequest(service="x" * length).SerializeToString()

    def answer(data: bytes):
        response = call(iter([data]) if method.client_streaming else data, timeout=30)
        return next(response) if method.server_streaming else response

    within = named(MAX_NAME_REQUEST_BYTES - 8)
    assert len(within) <= MAX_NAME_REQUEST_BYTES
    if method.name == "Check":  # an unknown name: the health protocol's NOT_FOUND
        with pytest.raises(grpc.RpcError) as unknown:
            answer(within)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    elif method.name == "Watch":
        assert health_pb2.HealthCheckResponse.FromString(answer(within)).status == (
            health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
    else:
        assert reflection_pb2.ServerReflectionResponse.FromString(answer(within)).error_response.error_code == (
            grpc.StatusCode.NOT_FOUND.value[0])
    past = named(MAX_NAME_REQUEST_BYTES)
    with pytest.raises(grpc.RpcError) as caught:
        answer(past)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = bad_request(caught.value).field_violations
    assert f"it is {len(past):,} bytes, over the {MAX_NAME_REQUEST_BYTES:,} this service takes" in violation.description
    assert_serving(channel)


def test_grpcs_own_services_still_answer_valid_requests(channel):
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
    names = {service.name for response in listed for service in response.list_services_response.service}
    assert {"halflife.v1.EmbeddingService", HEALTH_SERVICE.full_name, REFLECTION_SERVICE.full_name} <= names
    listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=30).statuses
    assert listed[""].status == listed["halflife.v1.EmbeddingService"].status == health_pb2.HealthCheckResponse.SERVING


def test_a_method_left_to_its_generated_base_class_is_grpcs_unimplemented(caplog):
    """add_service leaves out what a servicer does not implement (its
    generated base class's synchronous "not implemented"), so grpc answers
    UNIMPLEMENTED without a traceback: health's List was one such method
    until the server implemented it."""
    import asyncio

    from halflife.api.server import add_service

    serving = health_pb2.HealthCheckResponse.SERVING

    class CheckOnly(health_pb2_grpc.HealthServicer):
        async def Check(self, request, context):
            return health_pb2.HealthCheckResponse(status=serving)

    async def main():
        server = grpc.aio.server()
        add_service(server, HEALTH_SERVICE, CheckOnly())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == serving
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.List(health_pb2.HealthListRequest(), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


def test_refuse_malformed_wraps_an_async_generator_stream_and_refuses_a_client_stream_with_one_answer():
    # No served RPC streams from an async generator today (Health/Watch writes with context.write),
    # so this kind is checked here, without a server.
    import asyncio

    from halflife.api.errors import MalformedRequest, Received, refuse_malformed

    class Aborted(Exception):
        pass

    class Context:
        async def abort_with_status(self, status):
            self.status = status
            raise Aborted

    async def answers(request, context):
        for n in range(2):
            yield (request, n)

    handler = refuse_malformed(answers, client_streaming=False, server_streaming=True)

    async def drain(request, context):
        return [response async for response in handler(request, context)]

    context = Context()
    assert asyncio.run(drain(Received("ok", 2), context)) == [("ok", 0), ("ok", 1)]
    with pytest.raises(Aborted):
        asyncio.run(drain(Received(MalformedRequest("x.Request", "Wire format was corrupt"), 2), context))
    assert context.status.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TypeError, match="client stream with one response"):
        refuse_malformed(answers, client_streaming=True, server_streaming=False)
