"""RecommendService: validates requests, asks the interest engine, renders ranked items."""

from __future__ import annotations

import math

import grpc

from halflife.api.backend import Backend
from halflife.api.calls import run_with_deadline
from halflife.api.errors import not_found, translate_errors
from halflife.api.validation import MAX_ITEMS_PER_REQUEST, UNREADABLE, Violations, to_timestamp
from halflife.interest.types import ItemFilter, Recommendation, UnknownItemError
from halflife.texts import blank
from halflife.v1 import recommend_pb2, recommend_pb2_grpc

STRATEGIES = {
    "personalized": recommend_pb2.STRATEGY_PERSONALIZED,
    "trending": recommend_pb2.STRATEGY_TRENDING,
    "similarity": recommend_pb2.STRATEGY_SIMILARITY,
}


def _filter(message: recommend_pb2.ItemFilter, violations: Violations) -> ItemFilter:
    for name, check in (("include_categories", violations.category), ("exclude_categories", violations.category),
                        ("exclude_item_ids", violations.identifier)):
        values = getattr(message, name)
        if len(values) > MAX_ITEMS_PER_REQUEST:
            violations.add(f"filter.{name}", f"holds {len(values)} values; at most {MAX_ITEMS_PER_REQUEST}")
            continue
        for i, value in enumerate(values):
            check(value, f"filter.{name}[{i}]")
    return ItemFilter(
        include_categories=tuple(message.include_categories),
        exclude_categories=tuple(message.exclude_categories),
        exclude_item_ids=tuple(message.exclude_item_ids),
    )


def _items(result: Recommendation) -> list[recommend_pb2.ScoredItem]:
    out = []
    for item in result.items:
        message = recommend_pb2.ScoredItem(item_id=item.item_id, score=item.score)
        if item.explanation is not None:
            explanation = message.explanation
            for c in item.explanation.interests:
                explanation.interests.add(
                    interest_id=c.interest_id, labels=c.labels, similarity=c.similarity, share=c.share
                )
            for e in item.explanation.events:
                explanation.events.add(
                    event_id=e.event_id,
                    type=e.type,
                    item_id=e.item_id or "",
                    event_time=to_timestamp(e.event_time),
                    similarity=e.similarity,
                    weight=e.weight,
                )
            explanation.score_parts.update(item.explanation.score_parts)
        out.append(message)
    return out


class RecommendServicer(recommend_pb2_grpc.RecommendServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @translate_errors
    async def Recommend(self, request: recommend_pb2.RecommendRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        violations.stored_user(request.user_id, "user_id")
        violations.limit(request.limit, "limit", interest.config.ranking.max_limit)
        as_of = violations.timestamp(request, "as_of_time", "as_of_time", interest.now())
        item_filter = _filter(request.filter, violations)
        violations.text(request.query, "query")
        if request.query and blank(request.query):
            violations.add("query", f"{UNREADABLE}; leave it empty for no query")
        if not (math.isfinite(request.diversity) and 0 <= request.diversity <= 1):
            violations.add("diversity", f"must be between 0 and 1, got {request.diversity}")
        violations.raise_if_any()
        result = await run_with_deadline(
            context,
            interest.recommend,
            request.user_id,
            request.limit,
            as_of=as_of,
            filter=item_filter,
            include_seen=request.include_seen,
            query=request.query,
            explain=request.explain,
            diversity=request.diversity,
        )
        return recommend_pb2.RecommendResponse(items=_items(result), strategy=STRATEGIES[result.strategy])

    @translate_errors
    async def SimilarItems(self, request: recommend_pb2.SimilarItemsRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        target = request.WhichOneof("target")
        if target is None:
            # Both fields, not the oneof's name: a violation names a field of the request.
            violations.add("item_id", "set item_id or text")
            violations.add("text", "set text or item_id")
        elif target == "item_id":
            violations.stored_item(request.item_id, "item_id")
        elif not request.text:
            violations.add("text", "must not be empty")
        elif blank(request.text):
            violations.add("text", UNREADABLE)
        else:
            violations.text(request.text, "text")
        violations.limit(request.limit, "limit", interest.config.ranking.max_limit)
        item_filter = _filter(request.filter, violations)
        violations.raise_if_any()
        try:
            result = await run_with_deadline(
                context,
                interest.similar_items,
                item_id=request.item_id if target == "item_id" else None,
                text=request.text if target == "text" else None,
                limit=request.limit,
                filter=item_filter,
            )
        except UnknownItemError:
            raise not_found(f"no item {request.item_id!r}", [("item_id", "not in the catalogue")]) from None
        return recommend_pb2.SimilarItemsResponse(items=_items(result))
