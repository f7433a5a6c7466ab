"""EmbeddingService: validates requests, hands them to the engine's batcher, builds responses."""

from __future__ import annotations

import grpc
import numpy as np

from halflife.api.backend import Backend
from halflife.api.calls import deadline_of
from halflife.api.errors import translate_errors
from halflife.api.validation import MAX_INPUTS_PER_REQUEST, Violations
from halflife.deadlines import Deadline
from halflife.embedding.engine import InputsTooLongError, TokenizedInputs
from halflife.embedding.pooling import l2_normalize
from halflife.v1 import embedding_pb2, embedding_pb2_grpc

# Requests with at most this many characters are tokenized on the event loop
# (~0.45 us per character with warm caches, a few times that right after a
# forward pass), which saves the round trip through the tokenizer pool: 0.25-
# 0.3 ms of thread wake-ups per call on a shared 2-vCPU VM. Larger requests
# still go off the loop, so it is never blocked for long.
INLINE_TOKENIZE_CHARS = 512


async def _tokenize(backend: Backend, inputs: list[str], truncate: bool, deadline: Deadline) -> TokenizedInputs:
    """engine.tokenize on the event loop for a few short inputs, else on the
    tokenizer pool (see INLINE_TOKENIZE_CHARS)."""
    if sum(map(len, inputs)) <= INLINE_TOKENIZE_CHARS:
        return backend.embedding.tokenize(inputs, truncate)
    return await backend.tokenize_off_loop(inputs, truncate, deadline)


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @translate_errors
    async def Embed(self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext):
        backend = self._backend.ready()
        batcher = backend.batcher
        inputs = list(request.inputs)
        violations = Violations()
        if not violations.count(inputs, "inputs", MAX_INPUTS_PER_REQUEST):
            violations.raise_if_any()
        # Tokenizing is linear in the bytes, truncated or not: only the inputs short enough are.
        short = [i for i, text in enumerate(inputs) if violations.text(text, f"inputs[{i}]")]
        deadline = deadline_of(context)
        try:
            tokens = await _tokenize(backend, [inputs[i] for i in short], request.truncate, deadline)
        except InputsTooLongError as error:  # reported with the inputs too long in bytes: all at once
            for i, n in error.too_long:
                violations.add(f"inputs[{short[i]}]", f"{error.says(n)}; set truncate to cut it")
        else:  # "" where the tokenizer adds no special tokens: pooled, no token gave a zero vector
            for i in np.flatnonzero(tokens.token_counts == 0):
                violations.add(f"inputs[{short[i]}]", "is empty, and this model's tokenizer adds no tokens of its own: "
                                                      "there is nothing to embed")
        violations.raise_if_any()
        vectors = await batcher.submit(tokens.ids, deadline.expires)
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
        engine = self._backend.ready().embedding
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
