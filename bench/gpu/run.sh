#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, once the parts staged by
# prepare.sh lie in $STAGE_DIR: unpacks them, exports the bundled model there
# (fp16 included, validated against PyTorch), then runs bench.py on the CUDA
# execution provider against PyTorch CUDA fp16. Results go to $OUT.
# Takes about 3-4 minutes. See bench/gpu/README.md. Arguments go to bench.py
# (`--provider cpu --quick` rehearses the whole script on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE_DIR=${STAGE_DIR:-/tmp/stage}
OUT=${OUT:-var/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ ! -d "$STAGE_DIR/site" ]; then
    got=$(cat "$STAGE_DIR"/stage.part* | sha256sum | cut -d' ' -f1)
    [ "$got" = "$(cat "$STAGE_DIR/stage.sha256")" ] || { echo "staged parts are incomplete or damaged"; exit 1; }
    if command -v xz >/dev/null; then
        cat "$STAGE_DIR"/stage.part* | xz -dc -T0 | tar -x -C "$STAGE_DIR" || exit 1
    else
        cat "$STAGE_DIR"/stage.part* | python3 -c '
import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="data")' "$STAGE_DIR" || exit 1
    fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# onnxruntime-gpu lives in its own folder here, away from the CUDA libraries
# PyTorch installed, so its preload_dlls() cannot find them: point the loader there.
if nvidia_dirs=$(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null); then
    LD_LIBRARY_PATH=$(find $nvidia_dirs -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
fi
code=server:export:clients/python:.

# Preflight (CUDA runs only): the CUDA provider must load and run the carried fp16 model before a
# minute goes on the export; where it cannot, say which library is missing and stop.
case " $* " in *" --provider cpu "*) ;; *)
    # Diagnostic only (preload_dlls may still load a library by its full path): onnxruntime decides below.
    ldd "$STAGE_DIR/site/onnxruntime/capi/libonnxruntime_providers_cuda.so" | grep 'not found' \
        && echo "preflight: the loader does not find these (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
    PYTHONPATH="$STAGE_DIR/site:$code" timeout 120 python3 - "$STAGE_DIR/model" <<'EOF' 2>&1 | tee "$OUT/preflight.log" || exit 1
import sys, time
import numpy as np
from halflife.embedding.engine import EmbeddingEngine
started = time.perf_counter()
engine = EmbeddingEngine.load(sys.argv[1], provider="cuda", variant="fp16")
if engine.provider != "CUDAExecutionProvider":
    sys.exit(f"preflight: CUDA asked for, onnxruntime runs on {engine.provider}")
vectors = engine.forward(engine.tokenize(["preflight", "a second, longer sentence"] * 64, truncate=True).ids)
if not np.isfinite(vectors).all():
    sys.exit("preflight: the CUDA provider returned non-finite values")
print(f"preflight: CUDA provider ran the fp16 model in {time.perf_counter() - started:.1f} s (load included)")
EOF
esac

# The export stack needs transformers 4.57, older than the image's: it gets its own path.
model="$STAGE_DIR/exported"
started=$(date +%s)
if [ -n "${REUSE_EXPORT:-}" ] && [ -f "$model/manifest.json" ]; then  # a rerun on the same warm machine
    note="Model exported on this machine by an earlier run (halflife export: fp32 O2, fp16, int8, each validated against PyTorch)."
elif PYTHONPATH="$STAGE_DIR/site-export:$STAGE_DIR/site:$code" timeout 300 \
        python3 -m halflife.cli export --model "$STAGE_DIR/hf" --output "$model" --force \
        --model-id sentence-transformers/all-MiniLM-L6-v2 2>&1 | tee "$OUT/export.log"; then
    note="Model exported on this machine in $(( $(date +%s) - started )) s (halflife export: fp32 O2, fp16, int8, each validated against PyTorch)."
else
    model="$STAGE_DIR/model"
    note="Export on this machine FAILED (see export.log); benchmarked the fp16 variant exported on the CPU machine."
fi
echo "$note"

PYTHONPATH="$STAGE_DIR/site:$code" python3 bench/gpu/bench.py --model-dir "$model" --hf-model "$STAGE_DIR/hf" \
    --note "$note" --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
