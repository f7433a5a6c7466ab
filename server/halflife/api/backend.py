"""What the servicers call: set once the model is loaded, UNAVAILABLE before."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from halflife.api.errors import unavailable
from halflife.deadlines import Deadline
from halflife.embedding.batcher import BatcherStoppedError, DynamicBatcher
from halflife.embedding.engine import EmbeddingEngine
from halflife.embedding.pooling import l2_normalize
from halflife.interest.engine import InterestEngine


class Backend:
    def __init__(self) -> None:
        self.embedding: EmbeddingEngine | None = None
        self.batcher: DynamicBatcher | None = None
        self.interest: InterestEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Tokenization runs here, off the event loop (the tokenizers library
        # releases the GIL while it works).
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="halflife-tokenize")

    def attach(self, embedding: EmbeddingEngine, batcher: DynamicBatcher, loop: asyncio.AbstractEventLoop) -> None:
        self.embedding, self.batcher, self._loop = embedding, batcher, loop

    def close(self) -> None:
        self.tokenize_pool.shutdown(wait=False)

    def ready(self) -> Backend:
        if self.embedding is None or self.batcher is None or self.interest is None:
            raise unavailable("the server is still loading; retry shortly")
        return self

    def embed_blocking(self, texts: Sequence[str], deadline: Deadline | None = None) -> np.ndarray:
        """Unit embeddings of texts, truncated to the model's limit, from a
        worker thread: the work joins the server's shared dynamic batches,
        and is dropped (DeadlineExpiredError) once `deadline` passes.
        Returns (len(texts), dim) float32."""
        assert self.embedding is not None and self.batcher is not None and self._loop is not None
        tokens = self.embedding.tokenize(list(texts), truncate=True)
        # In pieces the queue can hold: a 1,000-item upsert under a smaller
        # --max-queued-inputs was refused as "queue full" however often retried.
        piece = self.batcher.config.max_queued_inputs
        expires = None if deadline is None else deadline.expires
        vectors = []
        try:
            for i in range(0, len(tokens.ids), piece):
                if deadline is not None:
                    deadline.check()  # a cancelled caller's next piece too
                submitted = self.batcher.submit(tokens.ids[i : i + piece], expires)
                vectors.append(asyncio.run_coroutine_threadsafe(submitted, self._loop).result())
        except concurrent.futures.CancelledError:  # stop() cancelled it: UNAVAILABLE, not an internal error
            raise BatcherStoppedError("the embedding model stopped (the server is shutting down)") from None
        return l2_normalize(np.concatenate(vectors))


def deadline_of(context: grpc.aio.ServicerContext) -> Deadline:
    """The call's deadline (none when the client set none)."""
    remaining = context.time_remaining()
    return Deadline(None if remaining is None else time.monotonic() + remaining)


async def in_thread(context: grpc.aio.ServicerContext, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs, deadline=the call's) on a worker thread. gRPC
    cancels the handler at the deadline or when the client cancels, but not
    the thread: the deadline tells it, and the store's writer, that the
    caller stopped waiting, so that a write the caller gave up on is not
    applied later, after the writes it has sent since."""
    deadline = deadline_of(context)
    try:
        return await asyncio.to_thread(fn, *args, **kwargs, deadline=deadline)
    except asyncio.CancelledError:
        deadline.cancelled = True
        raise
