import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from halflife.v1 import interest_pb2 as _interest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_PERSONALIZED: _ClassVar[Strategy]
    STRATEGY_TRENDING: _ClassVar[Strategy]
    STRATEGY_SIMILARITY: _ClassVar[Strategy]
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_PERSONALIZED: Strategy
STRATEGY_TRENDING: Strategy
STRATEGY_SIMILARITY: Strategy

class ItemFilter(_message.Message):
    __slots__ = ("include_categories", "exclude_categories", "exclude_item_ids")
    INCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    include_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, include_categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "limit", "as_of_time", "filter", "include_seen", "query", "explain", "diversity")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AS_OF_TIME_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    limit: int
    as_of_time: _timestamp_pb2.Timestamp
    filter: ItemFilter
    include_seen: bool
    query: str
    explain: bool
    diversity: float
    def __init__(self, user_id: _Optional[str] = ..., limit: _Optional[int] = ..., as_of_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ..., include_seen: _Optional[bool] = ..., query: _Optional[str] = ..., explain: _Optional[bool] = ..., diversity: _Optional[float] = ...) -> None: ...

class InterestContribution(_message.Message):
    __slots__ = ("interest_id", "labels", "similarity", "share")
    INTEREST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    interest_id: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    similarity: float
    share: float
    def __init__(self, interest_id: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., similarity: _Optional[float] = ..., share: _Optional[float] = ...) -> None: ...

class EventContribution(_message.Message):
    __slots__ = ("event_id", "type", "item_id", "event_time", "similarity", "weight")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    type: _interest_pb2.EventType
    item_id: str
    event_time: _timestamp_pb2.Timestamp
    similarity: float
    weight: float
    def __init__(self, event_id: _Optional[str] = ..., type: _Optional[_Union[_interest_pb2.EventType, str]] = ..., item_id: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., similarity: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("interests", "events", "score_parts")
    class ScorePartsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INTERESTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_PARTS_FIELD_NUMBER: _ClassVar[int]
    interests: _containers.RepeatedCompositeFieldContainer[InterestContribution]
    events: _containers.RepeatedCompositeFieldContainer[EventContribution]
    score_parts: _containers.ScalarMap[str, float]
    def __init__(self, interests: _Optional[_Iterable[_Union[InterestContribution, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[EventContribution, _Mapping]]] = ..., score_parts: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "explanation")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    explanation: Explanation
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "strategy")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    strategy: Strategy
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., strategy: _Optional[_Union[Strategy, str]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "text", "limit", "filter")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    limit: int
    filter: ItemFilter
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ..., limit: _Optional[int] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ...) -> None: ...
