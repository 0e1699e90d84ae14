#!/usr/bin/env bash
# KD-phase step time vs plain step time on one CUDA GPU (benchmarks/teacher_overhead.py, world 1).
#
# Needs torch (CUDA) and megatron-core 0.16.x. Either run it inside the docker image
# (docker/Dockerfile, which has everything), or on a bare GPU image that has torch but no
# megatron-core: then put megatron-core's wheel and its missing pure-Python deps under .whl/ in the
# repository root first (see the device README: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 ... -d .whl megatron-core==0.16.1`, plus whatever `import megatron.core`
# reports missing); this script installs them into /tmp/site and puts that on PYTHONPATH.
# Sized to finish in well under 5 minutes on an H100 (not measured yet: no GPU run so far).
# Usage: bash benchmarks/gpu_teacher_overhead.sh [extra teacher_overhead.py flags, e.g. --write-docs]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import megatron.core" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no megatron-core and no .whl/ wheels" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    python3 -c "import megatron.core"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Student 12L h768 (GPT-2 small shape, SwiGLU), teachers of ~1/2 and ~2x its layer FLOPs,
# vocab 32k, seq 1024, 8 micro-batches of 4: large enough that GEMMs, not launches, dominate.
timeout 280 python3 benchmarks/teacher_overhead.py --layouts 1:1:1 --bf16 \
    --student 12x768x12 --teachers 6x512x8 12x1024x16 --vocab 32768 --seq 1024 \
    --mbs 4 --gbs 32 --steps 3 --rounds 3 --reps 5 "$@"
