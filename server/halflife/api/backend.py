"""What the servicers call: set once the model is loaded, UNAVAILABLE before."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Sequence

import numpy as np

from halflife.api.errors import unavailable
from halflife.deadlines import POLL_S, Deadline, DeadlineExpiredError, check
from halflife.embedding.batcher import BatcherStoppedError, DynamicBatcher, QueueFullError
from halflife.embedding.engine import EmbeddingEngine, TokenizedInputs
from halflife.embedding.pooling import l2_normalize
from halflife.interest.engine import InterestEngine

# embed_blocking queues its inputs in pieces of a quarter of the queue bound; a
# later piece waits for room at most this long (its caller's deadline first).
EMBED_PIECES_PER_QUEUE = 4
ROOM_WAIT_S = 10.0


class Backend:
    def __init__(self, embedding_write_threads: int = 32) -> None:
        self.embedding: EmbeddingEngine | None = None
        self.batcher: DynamicBatcher | None = None
        self.interest: InterestEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Tokenization runs here, off the event loop (the tokenizers library
        # releases the GIL while it works).
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="halflife-tokenize")
        # Writes that embed texts (upserts, text events) run here: on the call threads they held them all while
        # the model worked through a backlog, and a GetItems behind 80 upserts waited 13.7 s for one (a review).
        # A query's one text stays on the call threads, where the batcher lets it pass bulk work.
        # As many as the call threads (`ServerConfig.call_threads`).
        self.embedding_writes = concurrent.futures.ThreadPoolExecutor(embedding_write_threads,
                                                                      thread_name_prefix="halflife-embedding-write")

    def attach(self, embedding: EmbeddingEngine, batcher: DynamicBatcher, loop: asyncio.AbstractEventLoop) -> None:
        self.embedding, self.batcher, self._loop = embedding, batcher, loop

    def close(self) -> None:
        self.tokenize_pool.shutdown(wait=False)
        self.embedding_writes.shutdown(wait=False)

    async def tokenize_off_loop(self, texts: list[str], truncate: bool, deadline: Deadline) -> TokenizedInputs:
        """embedding.tokenize on `tokenize_pool`, its texts counted against
        the batcher's queue bound until that work ends (QueueFullError past
        it). The work stops, DeadlineExpiredError, once the caller has gone
        (its deadline passed, or it cancelled): it went on to the end, ~0.04 s
        a 32 KiB text without spaces, and held a thread, memory past the
        bounds and every other caller's tokenizing (a review: 10 s for a short
        Embed behind two abandoned ones, 1.1 GB for 24 of them)."""
        batcher = self.batcher
        batcher.begin_tokenizing(len(texts))
        try:
            job = self.tokenize_pool.submit(_tokenize_unless_late, self.embedding, texts, truncate, deadline)
        except BaseException:
            batcher.end_tokenizing(len(texts))
            raise
        job.add_done_callback(lambda _: batcher.end_tokenizing(len(texts)))  # before the caller wakes to submit
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:  # the client cancelled, or gRPC's deadline: tell the thread
            deadline.cancelled = True
            raise

    def write_threads(self, embeds: bool) -> concurrent.futures.Executor | None:
        """Where a write runs (`run_with_deadline`'s threads): on `embedding_writes`
        where it has texts to embed, else on the call threads (None)."""
        return self.embedding_writes if embeds else None

    def ready(self) -> Backend:
        if self.embedding is None or self.batcher is None or self.interest is None:
            raise unavailable("the server is still loading; retry shortly")
        return self

    def embed_blocking(self, texts: Sequence[str], deadline: Deadline | None = None) -> np.ndarray:
        """Unit embeddings of texts, truncated to the model's limit, from a
        worker thread: the work joins the server's shared dynamic batches,
        ahead of Embed calls' (the batcher's `priority`: these are the
        service's own writes and queries, which queued behind a flood of
        Embed calls, p50 4-6 s on 2 cores), and is dropped (DeadlineExpiredError)
        once `deadline` passes.
        Returns (len(texts), dim) float32."""
        assert self.embedding is not None and self.batcher is not None and self._loop is not None
        tokens = self.embedding.tokenize(list(texts), truncate=True, check=lambda: check(deadline))
        # In pieces of a quarter of the queue: a 1,000-item upsert under a smaller --max-queued-inputs was
        # refused as "queue full" however often retried, and so was one in pieces of the whole bound while
        # any other call queued (a review: 4 of 4 tries with the queue 12-37% full).
        piece = max(1, self.batcher.config.max_queued_inputs // EMBED_PIECES_PER_QUEUE)
        vectors = []
        try:
            for i in range(0, len(tokens.ids), piece):
                vectors.append(self._submit_blocking(tokens.ids[i : i + piece], deadline, wait_for_room=i > 0))
        except concurrent.futures.CancelledError:  # stop() cancelled it: UNAVAILABLE, not an internal error
            raise BatcherStoppedError("the embedding model stopped (the server is shutting down)") from None
        return l2_normalize(np.concatenate(vectors))

    def _submit_blocking(self, ids: Sequence[np.ndarray], deadline: Deadline | None, wait_for_room: bool) -> np.ndarray:
        """batcher.submit from a worker thread. A full queue raises
        QueueFullError, unless `wait_for_room` (a later piece of a call whose
        first ones were computed): then it tries again until there is room,
        for at most ROOM_WAIT_S (a call without a deadline held one of the
        call threads for as long as the queue stayed full), or until the
        caller has gone (DeadlineExpiredError)."""
        expires = None if deadline is None else deadline.expires
        give_up = time.monotonic() + ROOM_WAIT_S
        while True:
            submitted = self.batcher.submit(ids, expires, priority=True)
            try:
                return _result_unless_abandoned(asyncio.run_coroutine_threadsafe(submitted, self._loop), deadline)
            except QueueFullError:
                if not wait_for_room or time.monotonic() >= give_up:
                    raise
            time.sleep(POLL_S)
            check(deadline)


def _tokenize_unless_late(engine: EmbeddingEngine, texts: list[str], truncate: bool,
                          deadline: Deadline) -> TokenizedInputs:
    """engine.tokenize, not begun once the caller has gone while it waited
    for a tokenizer thread, and given up between its batches."""
    deadline.check()
    return engine.tokenize(texts, truncate, check=deadline.check)


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

