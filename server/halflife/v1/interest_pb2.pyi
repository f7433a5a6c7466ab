import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_LIKE: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
    EVENT_TYPE_RATE: _ClassVar[EventType]
    EVENT_TYPE_REVIEW: _ClassVar[EventType]
    EVENT_TYPE_SEARCH: _ClassVar[EventType]
    EVENT_TYPE_SHARE: _ClassVar[EventType]
    EVENT_TYPE_DISLIKE: _ClassVar[EventType]
    EVENT_TYPE_SKIP: _ClassVar[EventType]

class Trend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TREND_UNSPECIFIED: _ClassVar[Trend]
    TREND_RISING: _ClassVar[Trend]
    TREND_STEADY: _ClassVar[Trend]
    TREND_FADING: _ClassVar[Trend]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_LIKE: EventType
EVENT_TYPE_ADD_TO_CART: EventType
EVENT_TYPE_PURCHASE: EventType
EVENT_TYPE_RATE: EventType
EVENT_TYPE_REVIEW: EventType
EVENT_TYPE_SEARCH: EventType
EVENT_TYPE_SHARE: EventType
EVENT_TYPE_DISLIKE: EventType
EVENT_TYPE_SKIP: EventType
TREND_UNSPECIFIED: Trend
TREND_RISING: Trend
TREND_STEADY: Trend
TREND_FADING: Trend

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "type", "item_id", "text", "value", "event_time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    type: EventType
    item_id: str
    text: str
    value: float
    event_time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., item_id: _Optional[str] = ..., text: _Optional[str] = ..., value: _Optional[float] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("accepted_count", "duplicate_count")
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    accepted_count: int
    duplicate_count: int
    def __init__(self, accepted_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("user_id", "as_of_time", "items_per_interest")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AS_OF_TIME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_INTEREST_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    as_of_time: _timestamp_pb2.Timestamp
    items_per_interest: int
    def __init__(self, user_id: _Optional[str] = ..., as_of_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., items_per_interest: _Optional[int] = ...) -> None: ...

class InterestLabel(_message.Message):
    __slots__ = ("label", "similarity")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    similarity: float
    def __init__(self, label: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class InterestItem(_message.Message):
    __slots__ = ("item_id", "text", "similarity")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    similarity: float
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class Interest(_message.Message):
    __slots__ = ("interest_id", "strength", "share", "trend", "labels", "top_items", "event_count", "last_event_time")
    INTEREST_ID_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    TREND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_ITEMS_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    interest_id: int
    strength: float
    share: float
    trend: Trend
    labels: _containers.RepeatedCompositeFieldContainer[InterestLabel]
    top_items: _containers.RepeatedCompositeFieldContainer[InterestItem]
    event_count: int
    last_event_time: _timestamp_pb2.Timestamp
    def __init__(self, interest_id: _Optional[int] = ..., strength: _Optional[float] = ..., share: _Optional[float] = ..., trend: _Optional[_Union[Trend, str]] = ..., labels: _Optional[_Iterable[_Union[InterestLabel, _Mapping]]] = ..., top_items: _Optional[_Iterable[_Union[InterestItem, _Mapping]]] = ..., event_count: _Optional[int] = ..., last_event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EventTypeCount(_message.Message):
    __slots__ = ("type", "count")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    type: EventType
    count: int
    def __init__(self, type: _Optional[_Union[EventType, str]] = ..., count: _Optional[int] = ...) -> None: ...

class GetProfileResponse(_message.Message):
    __slots__ = ("user_id", "interests", "event_counts", "last_event_time", "negative_strength")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INTERESTS_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    interests: _containers.RepeatedCompositeFieldContainer[Interest]
    event_counts: _containers.RepeatedCompositeFieldContainer[EventTypeCount]
    last_event_time: _timestamp_pb2.Timestamp
    negative_strength: float
    def __init__(self, user_id: _Optional[str] = ..., interests: _Optional[_Iterable[_Union[Interest, _Mapping]]] = ..., event_counts: _Optional[_Iterable[_Union[EventTypeCount, _Mapping]]] = ..., last_event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., negative_strength: _Optional[float] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("deleted_event_count",)
    DELETED_EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_event_count: int
    def __init__(self, deleted_event_count: _Optional[int] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token", "newest_first", "start_time", "end_time")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    newest_first: bool
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., newest_first: _Optional[bool] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token", "newest_first", "start_time", "end_time")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_page_token: str
    newest_first: bool
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., newest_first: _Optional[bool] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
