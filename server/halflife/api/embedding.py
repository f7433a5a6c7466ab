"""EmbeddingService: validates requests, hands them to the engine's batcher, builds responses."""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc

from halflife.api.errors import deadline_exceeded, invalid_argument, resource_exhausted, translate_errors, unavailable
from halflife.embedding.batcher import DeadlineExpiredError, DynamicBatcher, QueueFullError
from halflife.embedding.engine import EmbeddingEngine, InputsTooLongError
from halflife.embedding.pooling import l2_normalize
from halflife.v1 import embedding_pb2, embedding_pb2_grpc

MAX_INPUTS_PER_REQUEST = 256


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    """Serves an engine once `attach` has given it one; UNAVAILABLE before."""

    def __init__(self) -> None:
        self._engine: EmbeddingEngine | None = None
        self._batcher: DynamicBatcher | None = None
        # Tokenization runs here, off the event loop (the tokenizers library
        # releases the GIL while it works).
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="halflife-tokenize")

    def attach(self, engine: EmbeddingEngine, batcher: DynamicBatcher) -> None:
        self._engine, self._batcher = engine, batcher

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False)

    def _ready(self) -> tuple[EmbeddingEngine, DynamicBatcher]:
        if self._engine is None or self._batcher is None:
            raise unavailable("the model is still loading; retry shortly")
        return self._engine, self._batcher

    @translate_errors
    async def Embed(self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext):
        engine, batcher = self._ready()
        inputs = list(request.inputs)
        if not inputs:
            raise invalid_argument([("inputs", "must hold at least one text")])
        if len(inputs) > MAX_INPUTS_PER_REQUEST:
            raise invalid_argument(
                [("inputs", f"holds {len(inputs)} texts; at most {MAX_INPUTS_PER_REQUEST} per request")]
            )
        loop = asyncio.get_running_loop()
        try:
            tokens = await loop.run_in_executor(self._tokenize_pool, engine.tokenize, inputs, request.truncate)
        except InputsTooLongError as error:
            raise invalid_argument(
                [
                    (f"inputs[{i}]", f"has {n} tokens, more than the model's {error.max_tokens}; set truncate to cut it")
                    for i, n in error.too_long
                ]
            ) from None
        remaining = context.time_remaining()
        deadline = loop.time() + remaining if remaining is not None else None
        try:
            vectors = await batcher.submit(tokens.ids, deadline)
        except QueueFullError as error:
            raise resource_exhausted(f"{error}; retry with backoff") from None
        except DeadlineExpiredError:
            raise deadline_exceeded("the deadline passed before the inputs were computed") from None
        if not request.skip_normalize:
            vectors = l2_normalize(vectors)
        return embedding_pb2.EmbedResponse(
            embeddings=[
                embedding_pb2.Embedding(values=row, token_count=count, truncated=cut)
                for row, count, cut in zip(vectors.tolist(), tokens.token_counts.tolist(), tokens.truncated.tolist())
            ],
            total_tokens=int(tokens.token_counts.sum()),
        )

    @translate_errors
    async def GetModelInfo(self, request: embedding_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        engine, _ = self._ready()
        manifest = engine.manifest
        return embedding_pb2.GetModelInfoResponse(
            model_id=manifest.model_id,
            dimension=manifest.dimension,
            max_input_tokens=manifest.max_input_tokens,
            precision=engine.variant.precision,
            variant=engine.variant.name,
            execution_provider=engine.provider,
            pooling=manifest.pooling,
            max_inputs_per_request=MAX_INPUTS_PER_REQUEST,
        )
