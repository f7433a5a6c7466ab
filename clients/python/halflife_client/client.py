"""HalflifeClient and AsyncHalflifeClient: Python values in, NumPy arrays out.

Every call has a deadline (the client's `timeout` unless given per call), and
calls that fail with UNAVAILABLE (server restarting, connection dropped) are
retried with exponential backoff by gRPC itself; no other status is retried,
so a rejected request is never silently re-sent.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import grpc
import numpy as np

from halflife.v1 import embedding_pb2, embedding_pb2_grpc

DEFAULT_TIMEOUT_S = 10.0
MiB = 1 << 20

_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "halflife.v1.EmbeddingService"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _RETRY_SERVICE_CONFIG),
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
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


def _model_info(response: embedding_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(**{f.name: getattr(response, f.name) for f in dataclasses.fields(ModelInfo)})


def _embed_request(texts: Sequence[str], truncate: bool, normalize: bool) -> embedding_pb2.EmbedRequest:
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of texts, not one string")
    return embedding_pb2.EmbedRequest(inputs=list(texts), truncate=truncate, skip_normalize=not normalize)


def _vectors(response: embedding_pb2.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


class HalflifeClient:
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float = DEFAULT_TIMEOUT_S, channel=None):
        self._channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.timeout = timeout
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)

    def embed(
        self, texts: Sequence[str], *, truncate: bool = False, normalize: bool = True, timeout: float | None = None
    ) -> np.ndarray:
        """Embeds texts; returns (len(texts), dimension) float32 (unit rows unless normalize=False)."""
        response = self._embedding.Embed(_embed_request(texts, truncate, normalize), timeout=timeout or self.timeout)
        return _vectors(response)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(
            self._embedding.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=timeout or self.timeout)
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> HalflifeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncHalflifeClient:
    """asyncio client with the same methods as HalflifeClient, awaitable."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float = DEFAULT_TIMEOUT_S, channel=None):
        self._channel = channel or grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.timeout = timeout
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)

    async def embed(
        self, texts: Sequence[str], *, truncate: bool = False, normalize: bool = True, timeout: float | None = None
    ) -> np.ndarray:
        response = await self._embedding.Embed(
            _embed_request(texts, truncate, normalize), timeout=timeout or self.timeout
        )
        return _vectors(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(
            await self._embedding.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=timeout or self.timeout)
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncHalflifeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
