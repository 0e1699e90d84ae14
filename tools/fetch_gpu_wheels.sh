#!/usr/bin/env bash
# Download, here (with a package index), the wheels benchmarks/gpu_smoke.sh installs on a GPU
# machine that has torch but no package index: megatron-core and this package's other needs.
# torch itself is not fetched: the GPU machine's own CUDA build is used.
#
#   bash tools/fetch_gpu_wheels.sh [DIR (default .whl)] [PYTHON_VERSION (default 3.12)]
#
# About 41 MB for CPython 3.12 on x86_64; .whl/ is git-ignored (carry it to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=${2:-3.12}
mkdir -p "$dir"
python3 -m pip download -q --only-binary=:all: --no-deps --dest "$dir" \
    --python-version "$py" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
    megatron-core==0.16.1 numpy packaging sentencepiece pyyaml psutil tqdm \
    tensorboard tensorboard-data-server absl-py grpcio markdown protobuf werkzeug markupsafe \
    pillow setuptools pytest pluggy iniconfig
ls -1 "$dir"
du -sh "$dir"
