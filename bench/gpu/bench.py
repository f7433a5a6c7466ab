"""GPU embedding benchmark: Halflife on the CUDA execution provider vs PyTorch CUDA fp16.

Runs on a machine with an NVIDIA GPU (bench/gpu/run.sh sets it up there);
`--provider cpu --quick` smoke-tests it anywhere. Measures sentences/s at
batch 1, 32 and 256:

- ORT engine: Halflife's EmbeddingEngine (fp16 variant, IO binding) in-process;
- gRPC: `halflife serve` in its own process(es), driven by `halflife
  loadtest` client processes (so neither side shares a GIL with the other):
  single-sentence calls (dynamic batching) with 1 and 4 server workers, and
  batched calls;
- PyTorch: sentence-transformers, model.half() on CUDA (what a user would run).

Also checks the fp16 engine's embeddings against PyTorch fp32 (cosine).
Prints a table and writes JSON and markdown to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "clients" / "python", ROOT / "server"):
    sys.path.insert(0, str(path))

from bench.common import machine, versions_line  # noqa: E402
from halflife.embedding.engine import EmbeddingEngine  # noqa: E402
from halflife.embedding.pooling import cosine_rows, l2_normalize  # noqa: E402
from bench.server_process import ServerProcess  # noqa: E402  (not tests/: the GPU machine has no pytest)

WORDS = ("wireless headphones trail shoes garden hose espresso machine novel thriller jazz vinyl "
         "camera lens winter jacket yoga mat board game hiking map").split()
BATCHES = (1, 32, 256)
# (sentences per call, concurrent calls per client process, client processes, server workers)
GRPC_LOADS = ((1, 8, 4, 1), (1, 8, 4, 4), (32, 4, 2, 1), (256, 1, 2, 1))
GRPC_LOADS_QUICK = ((1, 4, 2, 1), (1, 4, 2, 2))


def sentences(n: int, words: int = 12, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(n)]


def throughput(fn, batch: list[str], seconds: float) -> float:
    """Sentences/s of `fn(batch)` called back to back after two warm-up calls."""
    fn(batch)
    fn(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def grpc_throughput(model_dir: Path, provider: str, seconds: float, loads) -> list[dict]:
    """Sentences/s through `halflife serve`, one server per worker count."""
    rows = []
    for workers in sorted({load[3] for load in loads}):
        with ServerProcess(model_dir, workers=workers, args=["--provider", provider]) as server:
            for batch, concurrency, clients, _ in (load for load in loads if load[3] == workers):
                rows.append(_drive(server.target, seconds, batch, concurrency, clients, workers))
                print(rows[-1], flush=True)
    return rows


def _drive(address: str, seconds: float, batch: int, concurrency: int, clients: int, workers: int) -> dict:
    """Runs `clients` loadtest processes at once; sums their sentences/s.
    Each opens a connection per concurrent call (at most): the kernel hands
    each connection to one worker for good, and one connection a process
    left most of 4 workers idle."""
    def loadtest(calls: int, *bounds: str) -> list[str]:
        return [sys.executable, "-m", "halflife.cli", "loadtest", "--call", "halflife.v1.EmbeddingService.Embed",
                "--data", json.dumps({"inputs": sentences(batch, seed=1)}), "--target", address,
                "--concurrency", str(calls), "--connections", str(calls), "--format", "json", *bounds]

    # Warm-up, so that first-shape CUDA allocations are not timed: over 8 connections a worker, which
    # leave one of them without any about once in 10,000 runs.
    warm = max(concurrency, 8 * workers)
    subprocess.run(loadtest(warm, "--total", str(4 * warm)), check=True, capture_output=True, timeout=120)
    # Calls in flight at the end finish (ghz's close would report them as Canceled).
    procs = [subprocess.Popen(loadtest(concurrency, "--duration", f"{seconds}s", "--duration-stop", "wait"),
                              stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    reports = [json.loads(p.communicate(timeout=seconds + 120)[0]) for p in procs]
    failed = {k: v for r in reports for k, v in r["statusCodeDistribution"].items() if k != "OK"}
    if failed:
        raise RuntimeError(f"gRPC load saw errors: {failed}")
    p50s = [d["latency"] for r in reports for d in r["latencyDistribution"] if d["percentage"] == 50]
    return {
        "method": f"gRPC Embed, {workers} worker(s), {clients}x{concurrency} concurrent calls",
        "batch": batch,
        "sentences_per_s": sum(r["count"] * batch / (r["total"] / 1e9) for r in reports),
        "p50_ms": float(np.median(p50s)) / 1e6 if p50s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True, help="Halflife model dir with the fp16 variant")
    parser.add_argument("--hf-model", type=Path, default=None, help="sentence-transformers model dir (fp32)")
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. where the model was exported)")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    batches = BATCHES[:2] if args.quick else BATCHES

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
        rows.append({"method": f"ORT engine ({engine.variant.name}, in-process)", "batch": b,
                     "sentences_per_s": throughput(ort, sentences(b), seconds)})
        print(rows[-1], flush=True)
    rows += grpc_throughput(args.model_dir, args.provider, seconds,
                            GRPC_LOADS_QUICK if args.quick else GRPC_LOADS)

    accuracy = {}
    if args.hf_model:
        torch_rows, accuracy = pytorch_baseline(args.hf_model, args.provider, batches, seconds, ort)
        rows += torch_rows

    import onnxruntime

    results = {"machine": machine(), "gpu": gpu_name(), "onnxruntime": onnxruntime.__version__,
               "provider": engine.provider, "variant": engine.variant.name, "note": args.note,
               "accuracy": accuracy, "rows": rows}
    table = markdown(results)
    print("\n" + table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_embedding.json").write_text(json.dumps(results, indent=2))
    (args.out_dir / "gpu_embedding.md").write_text(table)


def pytorch_baseline(hf_model: Path, provider: str, batches, seconds: float, ort) -> tuple[list[dict], dict]:
    """sentence-transformers throughput (fp16 on CUDA) and the engine's cosine
    to PyTorch fp32 on the same texts."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if provider == "cuda" else "cpu"
    model = SentenceTransformer(str(hf_model), device=device)

    def encode(batch, b):
        with torch.inference_mode():
            return model.encode(batch, batch_size=b, convert_to_numpy=True, normalize_embeddings=True)

    texts = sentences(256, seed=7) + sentences(64, words=40, seed=8)
    reference = encode(texts, 64)  # fp32
    accuracy = {"texts": len(texts), "reference": f"PyTorch fp32 on {device}",
                "engine_min_cosine": float(cosine_rows(ort(texts), reference).min())}
    label = "fp32"
    if device == "cuda":
        model = model.half()
        label = "fp16"
        accuracy["pytorch_fp16_min_cosine"] = float(cosine_rows(encode(texts, 64), reference).min())
    print(accuracy, flush=True)
    rows = []
    for b in batches:
        rows.append({"method": f"PyTorch sentence-transformers ({device}, {label})", "batch": b,
                     "sentences_per_s": throughput(lambda batch, b=b: encode(batch, b), sentences(b), seconds)})
        print(rows[-1], flush=True)
    return rows, accuracy


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"GPU: {results['gpu'] or 'none'}; CPU: {m['cpu']} ({m['usable_cores']} cores); "
        f"onnxruntime {results['onnxruntime']} on {results['provider']}, variant {results['variant']}; "
        f"Python {m['python']}, {m['date']}.",
        versions_line(m),
    ]
    if results["note"]:
        lines.append(results["note"])
    if results["accuracy"]:
        lines.append("Accuracy against " + results["accuracy"]["reference"] + ": " + ", ".join(
            f"{k} {v:.5f}" for k, v in results["accuracy"].items() if k.endswith("cosine")) + ".")
    lines += ["", "| method | batch | sentences/s | p50 ms |", "| --- | ---: | ---: | ---: |"]
    for row in results["rows"]:
        p50 = f"{row['p50_ms']:.2f}" if row.get("p50_ms") is not None else ""
        lines.append(f"| {row['method']} | {row['batch']} | {row['sentences_per_s']:.0f} | {p50} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
