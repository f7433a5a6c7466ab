"""HalflifeClient and AsyncHalflifeClient: Python values in, NumPy arrays out.

Items and events are passed as plain values (`Item`, `Event` dataclasses or
the generated messages); times are `datetime`s (naive ones are taken as UTC).
Recommendations and profiles come back as the generated, typed messages.

Every call has a deadline (the client's `timeout` unless one is given per call;
0 there is a deadline of now, not the default: a call that answers at once
may still get through, and a negative one always fails; a client made with
timeout=None sets none, and so does inf or anything past MAX_TIMEOUT_S, which
gRPC's deadline arithmetic would take for one already passed; NaN is a
ValueError), and calls that fail with UNAVAILABLE (a connection
dropped, a server restarting) are retried by gRPC itself, up to 4 attempts
with backoff from 0.1 s (gRPC's C core waits 0.1, 0.2 and 0.4 s, each
within 20%: 0.56-0.84 s in all, measured 0.64-0.81, for a blip, not a
restart that takes seconds, which the caller retries), as are those a server
shutting down answers CANCELLED: it cancels calls that had arrived but not
reached a handler yet (grpc/grpc#41785), and every Halflife call is safe to
repeat. A RecordEvents that fails ABORTED (items its events name changed
under each of the server's tries: nothing was recorded) is retried the same
way; other calls' ABORTED is not. No other status is retried, so a rejected
request is never silently re-sent. (A cancel of the caller's own is never
retried.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import numbers
import re
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from halflife.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    interest_pb2,
    interest_pb2_grpc,
    recommend_pb2,
    recommend_pb2_grpc,
)
from halflife_client.errors import ServerTooOldError

DEFAULT_PORT = 50051  # `halflife serve`'s
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
MAX_PAGE_SIZE = 1000  # the List RPCs' largest page (ListItems, ListEvents)
# Calls one connection to `halflife serve` carries at once (its HTTP/2
# max_concurrent_streams); a client opening more at once can see the extra
# ones refused UNAVAILABLE, before it has read the server's settings.
MAX_STREAMS_PER_CONNECTION = 256
DEFAULT_TIMEOUT_S = 10.0
# Longer deadlines mean none: past ~1e10 s gRPC's arithmetic overflows and a call failed at once.
MAX_TIMEOUT_S = 1e9
MiB = 1 << 20
MAX_RECONNECT_BACKOFF_MS = 2_000


def _retry_policy(*also_retryable: str) -> dict:
    """gRPC's retries: 4 tries of a call that failed UNAVAILABLE or CANCELLED
    (or one of `also_retryable`), with jittered backoff from 0.1 s."""
    return {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED", *also_retryable],
    }


_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "halflife.v1.EmbeddingService"},
                    {"service": "halflife.v1.CatalogService"},
                    {"service": "halflife.v1.InterestService"},
                    {"service": "halflife.v1.RecommendService"},
                ],
                "retryPolicy": _retry_policy(),
            },
            # RecordEvents' ABORTED is the server's "nothing was recorded, resend" (items its events name changed
            # under each of its tries). Elsewhere ABORTED can mean a conflict to redo at a higher level (AIP-194),
            # so only here; gRPC takes a method's own entry over its service's.
            {
                "name": [{"service": "halflife.v1.InterestService", "method": "RecordEvents"}],
                "retryPolicy": _retry_policy("ABORTED"),
            },
        ]
    }
)
# A channel to `halflife serve` without retries (what `halflife loadtest` uses: a
# load generator reports every failure): the server's 64 MiB messages, and
# reconnection at least every 2 s.
TRANSPORT_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
    # gRPC waits up to 120 s between reconnection attempts (1 s, x1.6 each): calls to a server back up
    # after a restart failed UNAVAILABLE at once, without trying, for as long as the wait had grown.
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _RETRY_SERVICE_CONFIG),
    # gRPC keeps a request for its retries only up to this size (256 KiB by
    # default): a full batch of upserts or texts was silently never retried.
    ("grpc.per_rpc_retry_buffer_size", 64 * MiB),
    *TRANSPORT_OPTIONS,
]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    model_id: str
    dimension: int
    max_input_tokens: int
    precision: str
    variant: str
    execution_provider: str
    pooling: str
    max_inputs_per_request: int


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    text: str = ""
    categories: Sequence[str] = ()
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    create_time: dt.datetime | None = None
    vector: Sequence[float] | np.ndarray | None = None

    def __post_init__(self):
        _keep_iterators(self, "categories")

    def to_proto(self) -> catalog_pb2.Item:
        text = _unset_as_empty(self.text)
        _require_strings("Item", id=self.id, text=text)
        attributes = {} if self.attributes is None else self.attributes  # None: none, as for text (an AttributeError)
        if not isinstance(attributes, Mapping):  # a list of pairs was an AttributeError (a review)
            raise TypeError(f"Item {self.id!r} attributes must be a dict of strings, "
                            f"not {type(attributes).__name__} {attributes!r}")
        for key, value in attributes.items():
            _require_strings(f"Item {self.id!r}", **{"attribute key": key, f"attribute {key!r}": value})
        categories = _strings("categories", () if self.categories is None else self.categories)
        item = _request(catalog_pb2.Item, id=self.id, text=text, categories=categories, attributes=dict(attributes))
        if self.create_time is not None:
            item.create_time.CopyFrom(to_timestamp(self.create_time))
        if self.vector is not None:
            item.vector.extend(_wire_vector(self.vector).tolist())
        return item


def _keep_iterators(value, *fields: str) -> None:
    """Each of `fields` that is an iterator (a generator) as a tuple of what it yields: to_proto read it once,
    so the same Item or Filter sent again (a resend after DEADLINE_EXCEEDED) had none, and the upsert replaced
    the item without its categories (a review)."""
    for name in fields:
        if isinstance(getattr(value, name), Iterator):
            object.__setattr__(value, name, tuple(getattr(value, name)))  # frozen dataclasses


def _wire_vector(vector) -> np.ndarray:
    """`vector` as the wire's float32. The server keeps its direction alone
    (it L2-normalises it), so a finite vector that float32 cannot hold is
    scaled by its largest entry first: with an entry past ~3.4e38 it went out
    holding inf, with every entry below ~1e-45 as zeros, and was refused for
    what it was not ("NaN or infinite values", "all zeros"). Anything but
    one row of real numbers is refused, naming what (a review): a 2-D array
    or a scalar failed as protobuf's "must be real number, not list" and
    "must assign iterable", and strings ("0.5"), bools, complex numbers
    (their imaginary part dropped, with a warning) and None (sent as NaN)
    were cast to floats."""
    given = np.asarray(vector)
    if given.ndim == 0:  # a number, a generator, a dict
        raise TypeError(f"vector must be a sequence of numbers, not {type(vector).__name__} {vector!r}")
    if given.ndim > 1:
        raise ValueError(f"vector must be one sequence of numbers, not an array of shape {given.shape}")
    if given.dtype.kind not in "fiu":
        for i, value in enumerate(given.tolist()):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"vector[{i}] must be a real number, not {type(value).__name__} {value!r}")
    wide = given.astype(np.float64)
    with np.errstate(over="ignore"):
        out = wide.astype(np.float32)
    if np.isfinite(wide).all() and wide.any() and not (np.isfinite(out).all() and out.any()):
        out = (wide / np.abs(wide).max()).astype(np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which items `recommend` and `similar_items` may return (ItemFilter):
    checked as Item's lists are, where the generated message took one
    string for its characters (include_categories="hiking": "h", "i", ...)."""
    include_categories: Sequence[str] = ()
    exclude_categories: Sequence[str] = ()
    exclude_item_ids: Sequence[str] = ()

    def __post_init__(self):
        _keep_iterators(self, *(field.name for field in dataclasses.fields(self)))

    def to_proto(self) -> recommend_pb2.ItemFilter:
        # None is none, as Item's categories (it was "'NoneType' object is not iterable").
        lists = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return _request(recommend_pb2.ItemFilter, **{name: _strings(name, () if values is None else values)
                                                     for name, values in lists.items()})


@dataclasses.dataclass(frozen=True)
class Event:
    event_id: str
    user_id: str
    type: int  # interest_pb2.EVENT_TYPE_*
    item_id: str = ""
    text: str = ""
    value: float | None = None
    event_time: dt.datetime | None = None  # None: the server's clock

    def to_proto(self) -> interest_pb2.Event:
        # None for the optional strings is unset (""), as protobuf takes it: eval's text-less ratings pass it.
        item_id, text = _unset_as_empty(self.item_id), _unset_as_empty(self.text)
        _require_strings("Event", event_id=self.event_id, user_id=self.user_id, item_id=item_id, text=text)
        event = _request(interest_pb2.Event, event_id=self.event_id, user_id=self.user_id, type=self.type,
                         item_id=item_id, text=text, value=_not_bool("value", self.value))
        if self.event_time is not None:
            event.event_time.CopyFrom(to_timestamp(self.event_time))
        return event


def to_timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp from a datetime (naive datetimes are UTC)."""
    if not isinstance(when, dt.datetime):  # a str or a date failed later on .tzinfo, an AttributeError
        raise TypeError(f"times are datetime.datetime values, got {type(when).__name__} {when!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromDatetime(when)
    except OverflowError:  # "date value out of range", naming no time: one near year 1 or 9999 whose UTC is past it
        raise ValueError(f"time {when.isoformat()} is, in UTC, outside what a Timestamp holds "
                         "(0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z)") from None
    return stamp


_NOT_IN_A_HOST = "/?#\\@"


def server_target(target: str) -> str:
    """`target` as gRPC is to get it, for a `halflife serve`: a host with no
    port ("localhost", "10.0.0.7", "[::1]") or an empty one ("localhost:")
    gets DEFAULT_PORT, where gRPC would go to 443; a target with a port or a
    scheme of gRPC's ("unix:/path", "dns:///host:port": _GRPC_SCHEMES) is kept.
    ValueError for an empty target or host (":50051"), an http(s):// URL, a
    port that is no number in 1..65535 (gRPC wraps one silently:
    127.0.0.1:99999 reaches port 34463), and an IPv6 address or a host with a
    colon out of brackets ("::1", "2001:db8::1:50051", "h:1:2": an IPv6
    address's last group would pass for a port), and a target holding a
    character that is not printable (a control, a surrogate).
    gRPC took a URL or "localhost:abc" for a host name and failed only at the
    first call, UNAVAILABLE ("Misformatted domain name", "Failed to parse
    port"). The CLI's --target and both clients take their target through
    here; the Go and Node clients follow the same rules (Node takes URLs)."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a string such as {DEFAULT_TARGET!r}, not {type(target).__name__} {target!r}")
    target = target.strip()
    if not target:
        raise ValueError("must be host:port, got an empty string")
    # A control character went on to gRPC ("Misformatted domain name" at the first call, after every retry), and
    # a surrogate (a shell's byte that is no UTF-8, as Python holds it) was gRPC's UnicodeEncodeError, a traceback
    # from the CLI's --target (a review).
    if stray := next((c for c in target if not c.isprintable()), None):
        raise ValueError(f"must be host:port, got {target!r}: a target holds no {stray!r}")
    if url := _URL_SCHEME.match(target):
        # Refused, not stripped: an https:// target would be called in plaintext all the same (TLS is credentials=).
        raise ValueError(f"give host:port, not a URL: drop the {url[0]}")
    if _bare_ipv6(target):
        raise ValueError(f"an IPv6 address goes in brackets: [{target}]:port")
    scheme = target.partition(":")[0].lower() in _GRPC_SCHEMES  # gRPC reads "DNS:///..." as dns
    host, port = target.removesuffix(":"), ""
    if ":" in host and not _bracketed(host):
        host, _, port = target.rpartition(":")
    # An IPv6 address with a port ("2001:db8::1:50051"), a second colon ("h:1:2") or no host (":50051") went
    # on to gRPC, which failed them only at the first call (an audit).
    if not scheme and host in ("", "[]"):
        raise ValueError(f"no host: give host:port, got {target!r}")
    # A path, query, user or space after or in the host ("localhost/x", "user@h") went on to gRPC, which failed
    # it only at the first call, UNAVAILABLE after every retry (a review; the Go and Node clients refuse it too).
    if not scheme and (stray := next((c for c in host if c in _NOT_IN_A_HOST or c.isspace()), None)):
        raise ValueError(f"must be host:port, got {target!r}: a host holds no {stray!r}")
    # Before the default port is added: "h:1:" and "::1:" became "h:1:50051" and "::1:50051" (a review).
    if not scheme and ":" in host and not _bracketed(host):
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port or 'port'}" if _bare_ipv6(host) else
                         f"must be host:port (an IPv6 host in brackets), got {target!r}")
    if not port:
        return f"{host}:{DEFAULT_PORT}"
    if _PORT.fullmatch(port):
        valid = 1 <= int(port) <= 65535
    else:  # only a scheme of gRPC's may end in no port ("unix:/run/halflife.sock")
        valid = scheme
    if not valid:
        raise ValueError(f"port must be 1 to 65535, got {port}")
    # The port as gRPC parses one: "+80" and "080" failed only at the first call (a review).
    return target if scheme else f"{host}:{int(port)}"


def host_port(host: str, port: int) -> str:
    """host:port as a gRPC target, an IPv6 address in brackets ("[::1]:50051")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# What a port looks like (int() would also take " 80", "8_0" and non-ASCII digits), in all three clients.
_PORT = re.compile(r"[+-]?[0-9]+")
_URL_SCHEME = re.compile(r"https?://", re.IGNORECASE)
# The schemes of gRPC's name resolvers (grpc/doc/naming.md, xDS's, and gRPC-Go's
# default passthrough): a target that starts with one is gRPC's to parse, any
# other is host[:port]. The Go client holds the same set.
_GRPC_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "passthrough"})


def _bracketed(host: str) -> bool:
    return host.startswith("[") and host.endswith("]")


def _bare_ipv6(target: str) -> bool:
    try:
        return ipaddress.ip_address(target).version == 6
    except ValueError:
        return False


def _unset_as_empty(value):
    return "" if value is None else value


def _require_strings(what: str, **fields) -> None:
    """TypeError naming the first of `fields` that is not a string: protobuf's
    ("bad argument type for built-in operation") named none (an audit)."""
    for name, value in fields.items():
        if not isinstance(value, str):
            raise TypeError(f"{what} {name} must be a string, not {type(value).__name__} {value!r}")


def _not_bool(name: str, value):
    """`value`, a TypeError if it is a bool: protobuf takes one for a double, refused for an int, so
    value=True was stored as a rating of 1 (a review; the Node client refuses it too)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    return value


def _strings(name: str, values: Sequence[str]) -> list[str]:
    """`values` as a list; TypeError for one string, which would be taken
    for a sequence of its characters (delete_items("sku-1") deleted the
    items "s", "k", "u", "-" and "1")."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} takes a sequence of strings, not one string: [{values!r}]?")
    # A dict went as its keys (embed({id: text}) embedded the ids), None as "'NoneType' object is not iterable".
    if isinstance(values, Mapping) or not isinstance(values, Iterable):
        raise TypeError(f"{name} takes a sequence of strings, not {type(values).__name__} {values!r}")
    return list(values)


# What a field takes, for _request's errors.
_FIELD_KINDS = {FieldDescriptor.CPPTYPE_STRING: "a string", FieldDescriptor.CPPTYPE_INT32: "a 32-bit whole number",
                FieldDescriptor.CPPTYPE_BOOL: "a bool", FieldDescriptor.CPPTYPE_DOUBLE: "a number"}


def _field_kind(field) -> str:
    if field.enum_type is not None:
        return f"one of {field.enum_type.name}'s values"
    return _FIELD_KINDS.get(field.cpp_type, field.cpp_type)


def _request(message_type, **fields):
    """message_type(**fields), or the TypeError or ValueError of the first
    field (or list element) protobuf refuses, named: its own errors ("bad
    argument type for built-in operation", "Value out of range: ...") named
    none (get_items([1]), recommend(1), limit=2**40: a review)."""
    try:
        return message_type(**fields)
    except (TypeError, ValueError, OverflowError) as error:  # OverflowError: an int no double holds (value=10**400)
        refused = error
    for name, value in fields.items():
        field = message_type.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:  # attributes: strings
            field, tried = field.message_type.fields_by_name["value"], [
                entry for k, v in value.items()
                for entry in ((f"{name} key", {name: {k: ""}}, k), (f"{name}[{k!r}]", {name: {k: v}}, v))]
        elif field.is_repeated:
            tried = [(f"{name}[{i}]", {name: [v]}, v) for i, v in enumerate(value)]
        else:
            tried = [(name, {name: value}, value)]
        kind = _field_kind(field)
        for label, one, v in tried:
            try:
                message_type(**one)
            except UnicodeError as error:  # a lone surrogate, bytes that are no UTF-8: its own words
                raise ValueError(f"{label} must be valid UTF-8 text, not {v!r} ({error.reason})") from None
            except (TypeError, ValueError, OverflowError) as error:  # rebuilt as the base class: some take more arguments
                kind_of_error = TypeError if isinstance(error, TypeError) else ValueError
                raise kind_of_error(f"{label} must be {kind}, not {type(v).__name__} {v!r}") from None
    raise refused


def _deadline(timeout: float | None, default: float | None) -> float | None:
    # None means the client's timeout; 0 is a deadline too (now), not "unset".
    return _seconds(default if timeout is None else timeout)


def _seconds(timeout: float | None) -> float | None:
    """A deadline for gRPC (see the module's docstring): None for none."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)):
        raise TypeError(f"timeout must be seconds (a number) or None, not {type(timeout).__name__} {timeout!r}")
    if timeout is None or timeout > MAX_TIMEOUT_S:
        return None
    if timeout != timeout:
        raise ValueError("timeout is NaN; give seconds, or math.inf for no deadline")
    return timeout


def _protos(name: str, values, message_type, value_type) -> list:
    """`values` (`value_type`s or `message_type`s: Item or catalog_pb2.Item, ...) as messages, each refused
    naming its place (items[3]); one of them alone, where a list goes, is a TypeError too. A dict, None or
    another type in the list was an AttributeError ("'dict' object has no attribute 'to_proto'"), and a field
    that to_proto refused did not say which element held it (a review)."""
    kinds = f"{value_type.__name__}s or {message_type.DESCRIPTOR.full_name} messages"
    if isinstance(values, (message_type, value_type)):
        raise TypeError(f"{name} takes a list of {kinds}, not one {type(values).__name__}: put it in a list")
    try:
        values = iter(values)
    except TypeError:
        raise TypeError(f"{name} takes a list of {kinds}, not {type(values).__name__} {values!r}") from None
    return [_proto(f"{name}[{i}]", v, message_type, value_type) for i, v in enumerate(values)]


def _proto(label: str, value, message_type, value_type):
    """`value` as a `message_type`, or the error of to_proto, which names a field, after `label`."""
    if isinstance(value, message_type):
        return value
    if not isinstance(value, value_type):
        raise TypeError(f"{label} must be {value_type.__name__} or {message_type.DESCRIPTOR.full_name}, "
                        f"not {type(value).__name__} {value!r}")
    try:
        return value.to_proto()
    except (TypeError, ValueError) as error:  # rebuilt as the base class, as _request's
        raise (TypeError if isinstance(error, TypeError) else ValueError)(f"{label}: {error}") from None


def _recommend_request(user_id, limit, as_of, include_seen, query, explain, diversity, item_filter):
    request = _request(recommend_pb2.RecommendRequest, user_id=user_id, limit=limit, include_seen=include_seen,
                       query=query, explain=explain, diversity=_not_bool("diversity", diversity))
    if as_of is not None:
        request.as_of_time.CopyFrom(to_timestamp(as_of))
    if item_filter is not None:
        request.filter.CopyFrom(_proto("item_filter", item_filter, recommend_pb2.ItemFilter, Filter))
    return request


def _similar_request(item_id, text, limit, item_filter):
    if (item_id is None) == (text is None):
        raise ValueError("give exactly one of item_id and text")
    target = {"item_id": item_id} if item_id is not None else {"text": text}
    request = _request(recommend_pb2.SimilarItemsRequest, limit=limit, **target)
    if item_filter is not None:
        request.filter.CopyFrom(_proto("item_filter", item_filter, recommend_pb2.ItemFilter, Filter))
    return request


def _profile_request(user_id, as_of, items_per_interest):
    request = _request(interest_pb2.GetProfileRequest, user_id=user_id, items_per_interest=items_per_interest)
    if as_of is not None:
        request.as_of_time.CopyFrom(to_timestamp(as_of))
    return request


def _model_info(response: embedding_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(**{f.name: getattr(response, f.name) for f in dataclasses.fields(ModelInfo)})


def _embed_request(texts: Sequence[str], truncate: bool, normalize: bool) -> embedding_pb2.EmbedRequest:
    # Checked here, not by protobuf, as it goes out negated: "false" was sent as normalize=True, and None (elsewhere
    # "not given") as False (a review). What protobuf takes for a bool is taken; None is the default.
    if normalize is not None and not isinstance(normalize, (numbers.Integral, np.bool_)):
        raise TypeError(f"normalize must be a bool, not {type(normalize).__name__} {normalize!r}")
    return _request(embedding_pb2.EmbedRequest, inputs=_strings("embed()", texts), truncate=truncate,
                    skip_normalize=normalize is not None and not normalize)


def _vectors(response: embedding_pb2.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def _list_events_request(user_id, page_size, page_token, newest_first, start_time,
                         end_time) -> interest_pb2.ListEventsRequest:
    request = _request(interest_pb2.ListEventsRequest, user_id=user_id, page_size=page_size, page_token=page_token,
                       newest_first=newest_first)
    for field, value in (("start_time", start_time), ("end_time", end_time)):
        if value is not None:
            getattr(request, field).CopyFrom(to_timestamp(value))
    return request


def _events_page(page: interest_pb2.ListEventsResponse,
                 request: interest_pb2.ListEventsRequest) -> interest_pb2.ListEventsResponse:
    """A ListEvents page as asked for: a server from before newest_first
    ignores it and lists oldest first, one from before start_time and
    end_time lists every event; each says so."""
    if request.newest_first and not page.newest_first:
        raise ServerTooOldError("the server listed the events oldest first: it predates ListEvents' newest_first "
                                "(upgrade it)")
    if any(request.HasField(f) and not page.HasField(f) for f in ("start_time", "end_time")):
        raise ServerTooOldError("the server listed the events of every time: it predates ListEvents' start_time "
                                "and end_time (upgrade it)")
    return page


def _paged(list_page: Callable[[str], Any], field: str) -> Iterator:
    """The `field` elements of every page a List RPC returns, from the first
    on: list_page(page_token) calls it for one page."""
    token = ""
    while True:
        page = list_page(token)
        yield from getattr(page, field)
        if not (token := page.next_page_token):
            return


async def _paged_async(list_page: Callable[[str], Awaitable], field: str) -> AsyncIterator:
    """_paged of an asyncio client's List RPC."""
    token = ""
    while True:
        page = await list_page(token)
        for element in getattr(page, field):
            yield element
        if not (token := page.next_page_token):
            return


def _own_channel(channel, credentials, interceptors) -> bool:
    """Whether the caller brought a channel; ValueError where they also
    asked for what only a channel made here gets."""
    if channel is not None and (credentials is not None or interceptors):
        raise ValueError("credentials and interceptors apply to the channel the client makes; "
                         "with channel=, add them to that channel (made with options=CHANNEL_OPTIONS)")
    return channel is not None


class _ClosedStub:
    """A closed client's stubs: every method raises as gRPC's own does on a closed channel."""

    def __getattr__(self, method: str):
        def closed(*args, **kwargs):
            raise ValueError("Cannot invoke RPC on closed channel!")
        return closed


class HalflifeClient:
    """Blocking client. Use as a context manager, or call close().

    The client makes its channel to `target` (checked, and given DEFAULT_PORT
    when it names no port, by server_target) with CHANNEL_OPTIONS (retries of
    UNAVAILABLE, CANCELLED and RecordEvents' ABORTED, 64 MiB messages):
    plaintext, or TLS with `credentials` (grpc.ssl_channel_credentials(...));
    `interceptors` (grpc client interceptors: auth metadata, logging) wrap it.
    A `channel` of your own is used as it is, without CHANNEL_OPTIONS unless
    it was made with them (a review: such a client refused replies over 4 MiB
    and retried nothing)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S, channel=None,
                 credentials: grpc.ChannelCredentials | None = None, interceptors: Sequence = ()):
        if not _own_channel(channel, credentials, interceptors):
            target = server_target(target)
            channel = (grpc.insecure_channel(target, options=CHANNEL_OPTIONS) if credentials is None
                       else grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS))
            channel = grpc.intercept_channel(channel, *interceptors) if interceptors else channel
        self._channel = channel
        self.timeout = _seconds(timeout)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        self._interest = interest_pb2_grpc.InterestServiceStub(self._channel)
        self._recommend = recommend_pb2_grpc.RecommendServiceStub(self._channel)

    def embed(
        self, texts: Sequence[str], *, truncate: bool = False, normalize: bool = True, timeout: float | None = None
    ) -> np.ndarray:
        """Embeds texts; returns (len(texts), dimension) float32 (unit rows unless normalize=False)."""
        response = self._embedding.Embed(_embed_request(texts, truncate, normalize), timeout=_deadline(timeout, self.timeout))
        return _vectors(response)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(
            self._embedding.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=_deadline(timeout, self.timeout))
        )

    def upsert_items(self, items: Sequence[Item | catalog_pb2.Item], *, timeout: float | None = None):
        """Creates or replaces items; returns (created, updated)."""
        response = self._catalog.UpsertItems(
            _request(catalog_pb2.UpsertItemsRequest, items=_protos("items", items, catalog_pb2.Item, Item)), timeout=_deadline(timeout, self.timeout)
        )
        return response.created_count, response.updated_count

    def delete_items(self, ids: Sequence[str], *, timeout: float | None = None) -> int:
        return self._catalog.DeleteItems(_request(catalog_pb2.DeleteItemsRequest, ids=_strings("ids", ids)), timeout=_deadline(timeout, self.timeout)).deleted_count

    def get_items(self, ids: Sequence[str], *, include_vectors: bool = False, timeout: float | None = None):
        request = _request(catalog_pb2.GetItemsRequest, ids=_strings("ids", ids), include_vectors=include_vectors)
        return list(self._catalog.GetItems(request, timeout=_deadline(timeout, self.timeout)).items)

    def list_items(self, *, page_size: int = 0, page_token: str = "", include_vectors: bool = False,
                   timeout: float | None = None) -> catalog_pb2.ListItemsResponse:
        """One page of the catalogue, in order of id: `.items` and `.next_page_token` ("" after the last page)."""
        request = _request(catalog_pb2.ListItemsRequest, page_size=page_size, page_token=page_token, include_vectors=include_vectors)
        return self._catalog.ListItems(request, timeout=_deadline(timeout, self.timeout))

    def iter_items(self, *, page_size: int = MAX_PAGE_SIZE, include_vectors: bool = False,
                   timeout: float | None = None) -> Iterator[catalog_pb2.Item]:
        """Every item of the catalogue, in order of id, a ListItems page at a time (`timeout` per page)."""
        return _paged(lambda token: self.list_items(page_size=page_size, page_token=token,
                                                    include_vectors=include_vectors, timeout=timeout), "items")

    def record_events(self, events: Sequence[Event | interest_pb2.Event], *, timeout: float | None = None):
        """Records events durably; returns (accepted, duplicates)."""
        response = self._interest.RecordEvents(
            _request(interest_pb2.RecordEventsRequest, events=_protos("events", events, interest_pb2.Event, Event)), timeout=_deadline(timeout, self.timeout)
        )
        return response.accepted_count, response.duplicate_count

    def profile(self, user_id: str, *, as_of: dt.datetime | None = None, items_per_interest: int = 0, timeout: float | None = None):
        return self._interest.GetProfile(_profile_request(user_id, as_of, items_per_interest), timeout=_deadline(timeout, self.timeout))

    def delete_user(self, user_id: str, *, timeout: float | None = None) -> int:
        return self._interest.DeleteUser(_request(interest_pb2.DeleteUserRequest, user_id=user_id), timeout=_deadline(timeout, self.timeout)).deleted_event_count

    def list_events(self, user_id: str, *, page_size: int = 0, page_token: str = "", newest_first: bool = False,
                    start_time: dt.datetime | None = None, end_time: dt.datetime | None = None,
                    timeout: float | None = None) -> interest_pb2.ListEventsResponse:
        """One page of the user's stored events, in the order recorded (newest_first: the reverse), those
        whose event_time is in [start_time, end_time) where given: `.events` and `.next_page_token`."""
        request = _list_events_request(user_id, page_size, page_token, newest_first, start_time, end_time)
        return _events_page(self._interest.ListEvents(request, timeout=_deadline(timeout, self.timeout)), request)

    def iter_events(self, user_id: str, *, page_size: int = MAX_PAGE_SIZE, newest_first: bool = False,
                    start_time: dt.datetime | None = None, end_time: dt.datetime | None = None,
                    timeout: float | None = None) -> Iterator[interest_pb2.Event]:
        """Every event stored for the user (in [start_time, end_time) where given), in the order recorded
        (newest_first: the reverse), a ListEvents page at a time."""
        return _paged(lambda token: self.list_events(user_id, page_size=page_size, page_token=token,
                                                     newest_first=newest_first, start_time=start_time,
                                                     end_time=end_time, timeout=timeout), "events")

    def recommend(
        self, user_id: str, limit: int = 10, *, as_of: dt.datetime | None = None, include_seen: bool = False,
        query: str = "", explain: bool = False, diversity: float = 0.0,
        item_filter: Filter | recommend_pb2.ItemFilter | None = None, timeout: float | None = None,
    ) -> recommend_pb2.RecommendResponse:
        request = _recommend_request(user_id, limit, as_of, include_seen, query, explain, diversity, item_filter)
        return self._recommend.Recommend(request, timeout=_deadline(timeout, self.timeout))

    def similar_items(
        self, *, item_id: str | None = None, text: str | None = None, limit: int = 10,
        item_filter: Filter | recommend_pb2.ItemFilter | None = None, timeout: float | None = None,
    ) -> recommend_pb2.SimilarItemsResponse:
        return self._recommend.SimilarItems(_similar_request(item_id, text, limit, item_filter), timeout=_deadline(timeout, self.timeout))

    def close(self) -> None:
        self._channel.close()
        # grpcio 1.85 crashes the process (SIGSEGV) on a call through an intercepted channel once it is
        # closed (a review): calls after close() raise here, as they do without interceptors.
        self._embedding = self._catalog = self._interest = self._recommend = _ClosedStub()

    def __enter__(self) -> HalflifeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncHalflifeClient:
    """asyncio client with the same methods as HalflifeClient, awaitable.

    Make it inside the event loop that uses it: gRPC's asyncio channel belongs
    to the loop it was made in (one made at import time fails in asyncio.run,
    "attached to a different loop"). After close(), calls raise
    grpc.aio.UsageError (HalflifeClient's: ValueError)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S, channel=None,
                 credentials: grpc.ChannelCredentials | None = None, interceptors: Sequence = ()):
        """As HalflifeClient's; `interceptors` are grpc.aio client interceptors."""
        if not _own_channel(channel, credentials, interceptors):
            target, interceptors = server_target(target), list(interceptors) or None
            channel = (grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
                       if credentials is None else
                       grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors))
        self._channel = channel
        self.timeout = _seconds(timeout)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        self._interest = interest_pb2_grpc.InterestServiceStub(self._channel)
        self._recommend = recommend_pb2_grpc.RecommendServiceStub(self._channel)

    async def embed(
        self, texts: Sequence[str], *, truncate: bool = False, normalize: bool = True, timeout: float | None = None
    ) -> np.ndarray:
        response = await self._embedding.Embed(
            _embed_request(texts, truncate, normalize), timeout=_deadline(timeout, self.timeout)
        )
        return _vectors(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(
            await self._embedding.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=_deadline(timeout, self.timeout))
        )

    async def upsert_items(self, items: Sequence[Item | catalog_pb2.Item], *, timeout: float | None = None):
        """Creates or replaces items; returns (created, updated)."""
        response = await self._catalog.UpsertItems(
            _request(catalog_pb2.UpsertItemsRequest, items=_protos("items", items, catalog_pb2.Item, Item)), timeout=_deadline(timeout, self.timeout)
        )
        return response.created_count, response.updated_count

    async def delete_items(self, ids: Sequence[str], *, timeout: float | None = None) -> int:
        return (await self._catalog.DeleteItems(_request(catalog_pb2.DeleteItemsRequest, ids=_strings("ids", ids)), timeout=_deadline(timeout, self.timeout))).deleted_count

    async def get_items(self, ids: Sequence[str], *, include_vectors: bool = False, timeout: float | None = None):
        request = _request(catalog_pb2.GetItemsRequest, ids=_strings("ids", ids), include_vectors=include_vectors)
        return list((await self._catalog.GetItems(request, timeout=_deadline(timeout, self.timeout))).items)

    async def list_items(self, *, page_size: int = 0, page_token: str = "", include_vectors: bool = False,
                         timeout: float | None = None) -> catalog_pb2.ListItemsResponse:
        request = _request(catalog_pb2.ListItemsRequest, page_size=page_size, page_token=page_token, include_vectors=include_vectors)
        return await self._catalog.ListItems(request, timeout=_deadline(timeout, self.timeout))

    def iter_items(self, *, page_size: int = MAX_PAGE_SIZE, include_vectors: bool = False,
                   timeout: float | None = None) -> AsyncIterator[catalog_pb2.Item]:
        return _paged_async(lambda token: self.list_items(page_size=page_size, page_token=token,
                                                          include_vectors=include_vectors, timeout=timeout), "items")

    async def record_events(self, events: Sequence[Event | interest_pb2.Event], *, timeout: float | None = None):
        """Records events durably; returns (accepted, duplicates)."""
        response = await self._interest.RecordEvents(
            _request(interest_pb2.RecordEventsRequest, events=_protos("events", events, interest_pb2.Event, Event)), timeout=_deadline(timeout, self.timeout)
        )
        return response.accepted_count, response.duplicate_count

    async def profile(self, user_id: str, *, as_of: dt.datetime | None = None, items_per_interest: int = 0, timeout: float | None = None):
        return await self._interest.GetProfile(_profile_request(user_id, as_of, items_per_interest), timeout=_deadline(timeout, self.timeout))

    async def delete_user(self, user_id: str, *, timeout: float | None = None) -> int:
        return (await self._interest.DeleteUser(_request(interest_pb2.DeleteUserRequest, user_id=user_id), timeout=_deadline(timeout, self.timeout))).deleted_event_count

    async def list_events(self, user_id: str, *, page_size: int = 0, page_token: str = "",
                          newest_first: bool = False, start_time: dt.datetime | None = None,
                          end_time: dt.datetime | None = None,
                          timeout: float | None = None) -> interest_pb2.ListEventsResponse:
        request = _list_events_request(user_id, page_size, page_token, newest_first, start_time, end_time)
        page = await self._interest.ListEvents(request, timeout=_deadline(timeout, self.timeout))
        return _events_page(page, request)

    def iter_events(self, user_id: str, *, page_size: int = MAX_PAGE_SIZE, newest_first: bool = False,
                    start_time: dt.datetime | None = None, end_time: dt.datetime | None = None,
                    timeout: float | None = None) -> AsyncIterator[interest_pb2.Event]:
        return _paged_async(lambda token: self.list_events(user_id, page_size=page_size, page_token=token,
                                                           newest_first=newest_first, start_time=start_time,
                                                           end_time=end_time, timeout=timeout), "events")

    async def recommend(
        self, user_id: str, limit: int = 10, *, as_of: dt.datetime | None = None, include_seen: bool = False,
        query: str = "", explain: bool = False, diversity: float = 0.0,
        item_filter: Filter | recommend_pb2.ItemFilter | None = None, timeout: float | None = None,
    ) -> recommend_pb2.RecommendResponse:
        request = _recommend_request(user_id, limit, as_of, include_seen, query, explain, diversity, item_filter)
        return await self._recommend.Recommend(request, timeout=_deadline(timeout, self.timeout))

    async def similar_items(
        self, *, item_id: str | None = None, text: str | None = None, limit: int = 10,
        item_filter: Filter | recommend_pb2.ItemFilter | None = None, timeout: float | None = None,
    ) -> recommend_pb2.SimilarItemsResponse:
        return await self._recommend.SimilarItems(_similar_request(item_id, text, limit, item_filter), timeout=_deadline(timeout, self.timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncHalflifeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
