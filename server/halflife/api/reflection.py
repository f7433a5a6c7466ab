"""Server reflection that serves the API's proto comments.

The generated stubs register each .proto without its comments (protoc
leaves source info out of them), so reflection served bare descriptors and
`grpcurl describe` showed no documentation. `make protos` also writes the
API's files with their source info (v1/descriptors.binpb); reflection sends
each file as the stubs registered it, with that source info added where
there is some. Only the source info: protoc's own copies also spell out
every field's json_name, which made grpcurl print JSON in lowerCamelCase
instead of the field names it printed before (and docs/api.md shows).
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection

DOCUMENTED_FILES = resources.files("halflife.v1") / "descriptors.binpb"  # a FileDescriptorSet


def source_infos() -> dict[str, descriptor_pb2.SourceCodeInfo]:
    """The API files' source info (their comments), by file name."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DOCUMENTED_FILES.read_bytes()).file
    return {file.name: file.source_code_info for file in files}


class _DocumentedFile:
    """A FileDescriptor as reflection reads it (name, dependencies,
    CopyToProto), copied with its source info where it has some."""

    def __init__(self, file, documented: dict[str, descriptor_pb2.SourceCodeInfo]) -> None:
        self._file, self._documented = file, documented
        self.name = file.name
        self.dependencies = [_DocumentedFile(dependency, documented) for dependency in file.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802 (the descriptor's name)
        self._file.CopyToProto(proto)
        if self.name in self._documented:
            proto.source_code_info.CopyFrom(self._documented[self.name])


class _DocumentedPool:
    """The default descriptor pool, its files answered as `_DocumentedFile`s."""

    def __init__(self, documented: dict[str, descriptor_pb2.SourceCodeInfo]) -> None:
        self._pool, self._documented = descriptor_pool.Default(), documented

    def FindFileByName(self, name: str) -> _DocumentedFile:  # noqa: N802 (DescriptorPool's names)
        return _DocumentedFile(self._pool.FindFileByName(name), self._documented)

    def FindFileContainingSymbol(self, symbol: str) -> _DocumentedFile:  # noqa: N802
        # upb's pool finds messages, enums, services and extensions, not a method, field or enum value
        # (`grpcurl describe halflife.v1.RecommendService.Recommend` was "Symbol not found"): those are
        # found in their parent's file.
        try:
            file = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, member = symbol.rpartition(".")
            if not self._has_member(parent, member):
                raise
            file = self._pool.FindFileContainingSymbol(parent)
        return _DocumentedFile(file, self._documented)

    def _has_member(self, parent: str, member: str) -> bool:
        """Whether `parent` is a service with a method, a message with a field
        or an enum with a value called `member`."""
        finds = ((self._pool.FindServiceByName, "methods_by_name"), (self._pool.FindMessageTypeByName, "fields_by_name"),
                 (self._pool.FindEnumTypeByName, "values_by_name"))
        for find, members in finds:
            try:
                if member in getattr(find(parent), members):
                    return True
            except KeyError:
                pass
        return False

    def __getattr__(self, name: str):  # message types and extensions, as the pool has them
        return getattr(self._pool, name)


def reflection_servicer(service_names: list[str]) -> reflection.aio.ReflectionServicer:
    """grpc's reflection servicer for `service_names`, serving the API's comments."""
    return reflection.aio.ReflectionServicer(service_names, pool=_DocumentedPool(source_infos()))
