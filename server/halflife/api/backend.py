"""What the servicers call: set once the model is loaded, UNAVAILABLE before."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Iterator, Sequence

import numpy as np

from halflife.api.errors import unavailable
from halflife.deadlines import POLL_S, Deadline, DeadlineExpiredError
from halflife.embedding.batcher import BatcherStoppedError, DynamicBatcher, QueueFullError
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
        self._tokenizing = 0  # Embed inputs handed to tokenize_pool and not yet queued (event loop only)

    def attach(self, embedding: EmbeddingEngine, batcher: DynamicBatcher, loop: asyncio.AbstractEventLoop) -> None:
        self.embedding, self.batcher, self._loop = embedding, batcher, loop

    def close(self) -> None:
        self.tokenize_pool.shutdown(wait=False)

    @contextlib.contextmanager
    def tokenizing(self, inputs: int) -> Iterator[None]:
        """Counts `inputs` against the batcher's queue bound while they are
        tokenized, before they reach it: unbounded, 40 calls of 256 long texts
        all waited for the 2 tokenizer threads (a review: 601 s, 0 refused,
        a short call behind 12 of them 117 s). Raises QueueFullError, as the
        queue does. Event loop only."""
        limit, queued = self.batcher.config.max_queued_inputs, self.batcher.queued_inputs
        if self._tokenizing + queued + inputs > limit:
            raise QueueFullError(f"embedding queue full ({self._tokenizing} inputs being tokenized and {queued} "
                                 f"waiting, max {limit})")
        self._tokenizing += inputs
        try:
            yield
        finally:
            self._tokenizing -= inputs

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
                submitted = self.batcher.submit(tokens.ids[i : i + piece], expires)
                vectors.append(_result_unless_abandoned(asyncio.run_coroutine_threadsafe(submitted, self._loop),
                                                        deadline))
        except concurrent.futures.CancelledError:  # stop() cancelled it: UNAVAILABLE, not an internal error
            raise BatcherStoppedError("the embedding model stopped (the server is shutting down)") from None
        return l2_normalize(np.concatenate(vectors))


def _result_unless_abandoned(future: concurrent.futures.Future, deadline: Deadline | None):
    """future.result(); once `deadline` says the caller stopped waiting,
    cancels the work (the batcher then skips what it has not computed) and
    raises DeadlineExpiredError."""
    while True:
        try:
            return future.result(timeout=None if deadline is None else POLL_S)
        except TimeoutError:
            try:
                deadline.check()
            except DeadlineExpiredError:
                future.cancel()
                raise

