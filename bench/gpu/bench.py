"""GPU embedding benchmark: Halflife on the CUDA execution provider vs PyTorch CUDA fp16.

Runs on a machine with an NVIDIA GPU (see bench/gpu/README.md for getting the
wheels there); `--provider cpu --quick` smoke-tests it anywhere. Prints a
short table of sentences/s at batch 1, 32 and 256:

- ORT engine: Halflife's EmbeddingEngine (fp16 variant, IO binding) in-process;
- gRPC: the same engine behind a real server on 127.0.0.1, 32 concurrent
  single-sentence calls (dynamic batching) and batched calls;
- PyTorch: sentence-transformers, model.half() on CUDA (what a user would run).
Writes results JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import machine  # noqa: E402
from halflife.embedding.engine import EmbeddingEngine  # noqa: E402
from halflife.embedding.pooling import l2_normalize  # noqa: E402

WORDS = ("wireless headphones trail shoes garden hose espresso machine novel thriller jazz vinyl "
         "camera lens winter jacket yoga mat board game hiking map").split()


def sentences(n: int, words: int = 12, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(n)]


def throughput(fn, batch: list[str], seconds: float) -> float:
    fn(batch)  # warm-up (CUDA graphs, allocator)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def grpc_throughput(engine_dir: Path, provider: str, seconds: float, batch: int, concurrency: int) -> float:
    import tempfile

    from halflife.api.server import ServerConfig
    from halflife.loadtest import LoadTestOptions, run_load_test
    from tests.serving import ServerThread

    with tempfile.TemporaryDirectory() as data, ServerThread(
        ServerConfig(port=0, model_dir=engine_dir, data_dir=Path(data), provider=provider, variant=None)
    ) as server:
        payload = json.dumps({"inputs": sentences(batch, seed=1)})
        options = LoadTestOptions(call="halflife.v1.EmbeddingService.Embed", data=payload, target=server.address,
                                  concurrency=concurrency, total=None, duration=seconds)
        report = asyncio.run(run_load_test(options))
        assert report["statusCodeDistribution"].get("OK", 0) == report["count"], report["errorDistribution"]
        return report["count"] * batch / (report["total"] / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True, help="Halflife model dir with the fp16 variant")
    parser.add_argument("--hf-model", type=Path, default=None, help="sentence-transformers model dir for PyTorch")
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_embedding.json")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    batches = (1, 32) if args.quick else (1, 32, 256)

    variant = "fp16" if args.provider == "cuda" else None
    engine = EmbeddingEngine.load(args.model_dir, provider=args.provider, variant=variant)
    print(f"engine: variant {engine.variant.name}, provider in use {engine.provider}", flush=True)
    if args.provider == "cuda" and engine.provider != "CUDAExecutionProvider":
        sys.exit("CUDA was asked for but onnxruntime runs on " + engine.provider)

    def ort(batch):
        tokens = engine.tokenize(batch, truncate=True)
        return l2_normalize(engine.forward(tokens.ids))

    rows = []
    for b in batches:
        rows.append({"method": "ORT engine (Halflife, in-process)", "batch": b,
                     "sentences_per_s": throughput(ort, sentences(b), seconds)})
        print(rows[-1], flush=True)
    for b, c in ((1, 32), (32, 8)) if not args.quick else ((1, 8),):
        rows.append({"method": f"gRPC Embed, {c} concurrent calls", "batch": b,
                     "sentences_per_s": grpc_throughput(args.model_dir, args.provider, seconds, b, c)})
        print(rows[-1], flush=True)
    if args.hf_model:
        import torch
        from sentence_transformers import SentenceTransformer

        device = "cuda" if args.provider == "cuda" else "cpu"
        model = SentenceTransformer(str(args.hf_model), device=device)
        if device == "cuda":
            model = model.half()

        for b in batches:
            def torch_embed(batch, b=b):
                with torch.inference_mode():
                    return model.encode(batch, batch_size=b, convert_to_numpy=True, normalize_embeddings=True)

            rows.append({"method": f"PyTorch sentence-transformers ({device}, {'fp16' if device == 'cuda' else 'fp32'})",
                         "batch": b, "sentences_per_s": throughput(torch_embed, sentences(b), seconds)})
            print(rows[-1], flush=True)

    print(f"\n{'method':<52} {'batch':>5} {'sentences/s':>12}")
    for row in rows:
        print(f"{row['method']:<52} {row['batch']:>5} {row['sentences_per_s']:>12.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "provider": engine.provider, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
