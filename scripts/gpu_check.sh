#!/usr/bin/env bash
# GPU check: one prepared command that proves the CUDA path of the product (issue 17) and writes ONE JSON.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR] [--exporter dynamo|torchscript] [--no-compile]
#   bash scripts/gpu_check.sh --prepare-carry        # here, before a session's device call (see below)
#
# What it checks (scripts/gpu_check.py holds the steps; DIR/gpu_check.json holds every result):
#   (a) trains the `smoke` recipe and a 300-step `cifar10-gpu`-shaped run (full-width ResNet-18, 512-d projector,
#       LARS, K = 8192, batch 256, on Fashion-MNIST as 3 x 32 x 32) with bf16 autocast and channels_last, and
#       reports images/s and peak GPU memory; a torch.compile probe (eager vs compiled train-step images/s)
#       says whether compiling would pay;
#   (b) runs the same short run as a plain process and under `torchrun --nproc_per_node 1` (NCCL; gloo with
#       --device cpu) and checks the per-step losses (and, on CPU, the final weights) match;
#   (c) exports the CUDA-trained checkpoint to ONNX through the product's parity gate and embeds with
#       onnxruntime (CUDA provider if present, else CPU) against PyTorch fp32 (gate: max |err| <= 1e-4, no zero
#       flip beyond 1e-5; an exact zero pattern is reported, and the CPU test requires it);
#   (d) TensorRT export + parity and the FAISS backend's GPU search when those packages import, else
#       "not available";
#   (e) writes DIR/gpu_check.json (default runs/gpu-check) after every step; exit 0 = every check passed.
# --device cpu runs the same steps on CPU (gloo for DDP) as the test suite's smoke test; --quick shrinks every
# step (well under a minute on 2 CPU cores). The full CUDA run is planned for under 8 minutes on one H200
# (UNVERIFIED: no session with a GPU has run it yet; docs/RESULTS.md says so).
#
# Packages: only what the device machine's image holds (library KINDS.md: Python 3.12, torch + CUDA,
# torchvision, numpy, scipy, Pillow, safetensors, tqdm, onnx, onnxscript, onnxruntime). The check blocks
# fastapi, pydantic-settings, faiss, numba, uvicorn and the [dev] packages before importing the project, proving
# it needs none of them (faiss and numba are lifted for the optional faiss step). The image lacks pydantic, which
# models/, pretrain/ and export/ need (their config and metadata schemas), so its wheels are carried: the
# default GPU_CHECK_WHEELS below (~2.8 MB). A future image lacking more names its wheel(s) there too
# (e.g. GPU_CHECK_WHEELS="$DEFAULT tqdm==4.67.1"): they are fetched with `pip download` for
# CPython 3.12 / manylinux x86-64 into .gpucheck/wheels, and this script installs them on the device into a
# private --target folder.
#
# Data: --prepare-carry copies the real Fashion-MNIST (Debian package dataset-fashion-mnist, 30 MB) into
# .gpucheck/fashion-mnist; without it the check falls back to synthetic images in Fashion-MNIST's format and
# says so in the JSON ("data": {"real": false}).
#
# How a session with a GPU runs it (device tool `run`; planned at 4-6 minutes, not yet measured):
#   1. here:   bash scripts/gpu_check.sh --prepare-carry          # fills .gpucheck/ (git-ignored)
#      (in the checkout the session was started in: the device gets that checkout, even from a helper's worktree)
#   2. run(command="set -o pipefail; PYTHONUNBUFFERED=1 timeout -k 20 480 bash scripts/gpu_check.sh --out $OUT 2>&1
#              | tee $OUT/gpu_check.log", carry=[".gpucheck"], timeout_s=540)
#   3. read the returned gpu_check.json, put its numbers in docs/RESULTS.md with the date, give_back().
# `timeout -k 20 480` keeps the check under 8 minutes (TERM, then KILL 20 s later); the JSON written after each
# step comes back even then. 540 s plus the machine's start (1-2 min) fits the 15-minute lease; a try that fails
# early leaves time to fix and rerun.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$REPO/.gpucheck"

if [[ "${1:-}" == "--prepare-carry" ]]; then
    mkdir -p "$CARRY/wheels"
    src="${LPJEPA_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
    if [[ -f "$src/train-images-idx3-ubyte.gz" ]]; then
        mkdir -p "$CARRY/fashion-mnist"
        cp "$src"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz "$CARRY/fashion-mnist/"
    else
        echo "gpu_check: no Fashion-MNIST in $src (apt-get install dataset-fashion-mnist);" \
            "the GPU run will use synthetic data" >&2
    fi
    # The venv's own versions (pyproject: pydantic>=2.6), CPython 3.12 builds.
    GPU_CHECK_WHEELS="${GPU_CHECK_WHEELS-pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0}"
    if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
        # shellcheck disable=SC2086  # the list is meant to split into package==version words
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$CARRY/wheels" $GPU_CHECK_WHEELS
    fi
    du -sh "$CARRY"
    echo "carry folder ready: run(..., carry=[\".gpucheck\"]) -- must stay under 64 MiB with the working tree"
    exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi
fi

extra_path=""
shopt -s nullglob
wheels=("$CARRY"/wheels/*.whl)
if ((${#wheels[@]})); then
    site="$(mktemp -d /tmp/gpucheck-site.XXXXXX)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
    extra_path="$site"
fi
if [[ -z "${LPJEPA_FASHION_MNIST_DIR:-}" && -f "$CARRY/fashion-mnist/train-images-idx3-ubyte.gz" ]]; then
    export LPJEPA_FASHION_MNIST_DIR="$CARRY/fashion-mnist"
fi
export PYTHONPATH="$REPO${extra_path:+:$extra_path}${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"
exec "$PY" "$REPO/scripts/gpu_check.py" "$@"
