"""Typed Python client for Halflife's gRPC API (sync and asyncio).

    from halflife_client import HalflifeClient
    with HalflifeClient("127.0.0.1:50051") as client:
        vectors = client.embed(["running shoes", "trail jacket"])  # (2, 384) float32
"""

from halflife_client.client import (
    CHANNEL_OPTIONS, DEFAULT_PORT, DEFAULT_TIMEOUT_S, AsyncHalflifeClient, Event, Filter, HalflifeClient, Item, ModelInfo,
    server_target, to_timestamp,
)
from halflife_client.errors import ServerTooOldError, field_violations, rich_status

__all__ = ["CHANNEL_OPTIONS", "DEFAULT_PORT", "DEFAULT_TIMEOUT_S", "AsyncHalflifeClient", "Event", "Filter", "HalflifeClient", "Item", "ModelInfo",
           "ServerTooOldError", "field_violations", "rich_status", "server_target", "to_timestamp"]
