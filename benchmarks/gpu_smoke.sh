#!/usr/bin/env bash
# GPU smoke test on one CUDA GPU, sized for at most 5 minutes. On a machine with torch (CUDA)
# but no package index, it installs megatron-core and the rest from a folder of wheels made with
# tools/fetch_gpu_wheels.sh, then runs:
#   1. tests/gpu and tests/unit, on CUDA (the GPU paths: Triton KD loss, no host syncs, ...);
#   2. a bf16 KD run: a small teacher for 20 steps, then a student for 30 steps (20 with KD),
#      teacher TP 1, student TP 1, on megatron's mock data;
#   3. the KD-loss GPU benchmark (benchmarks/gpu_kd_loss.py, reduced sizes);
#   4. the teacher-overhead benchmark (benchmarks/teacher_overhead.py, one layout, reduced);
# and prints one summary (also written to $OUT/gpu_smoke_summary.txt when $OUT is set, with each
# step's log beside it). Steps run even if an earlier one fails; the exit code is 0 only if all
# passed. Without CUDA it stops at once (exit 2).
#
#   bash benchmarks/gpu_smoke.sh [WHEEL_DIR (default .whl)]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
wheels=${1:-.whl}
out=${OUT:-/tmp/gpu_smoke}
mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3

if ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_smoke: no CUDA device visible to torch" >&2
    exit 2
fi
need="import megatron.core, sentencepiece, tensorboard, yaml, psutil, tqdm, pytest"
if ! $py -c "$need" 2>/dev/null; then
    [[ -d $wheels ]] || { echo "gpu_smoke: missing packages and no wheel folder $wheels" >&2; exit 2; }
    $py -m venv --system-site-packages /tmp/gpu_smoke_venv
    py=/tmp/gpu_smoke_venv/bin/python
    $py -m pip install -q --no-index --find-links "$wheels" megatron-core==0.16.1 \
        sentencepiece tensorboard pyyaml psutil tqdm pytest || exit 2
    $py -c "$need" || exit 2
fi

declare -a names=() codes=() secs=()
run_step() {  # run_step NAME SECONDS COMMAND...: time-limited, log to $out/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    names+=("$name") codes+=("$rc") secs+=("$(($(date +%s) - start))")
    echo "[$name] exit $rc after ${secs[-1]} s (log: $out/$name.log)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
$py -c "import torch, megatron.core as m; print('torch', torch.__version__, '| megatron-core', \
m.__version__, '|', torch.cuda.get_device_name())" >>"$out/gpu.txt" 2>&1

run_step tests 90 $py -m pytest -q -p no:cacheprovider tests/gpu tests/unit

work=$(mktemp -d)
small=(--mock-data --vocab-size 32000 --seq-length 512 --micro-batch-size 8 --global-batch-size 32
       --bf16 --log-interval 5 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 5)
run_step teacher 60 $py pretrain_salt.py "${small[@]}" --num-layers 4 --hidden-size 512 \
    --num-attention-heads 8 --train-iters 20 --save "$work/teacher"
run_step kd_run 70 $py pretrain_salt.py "${small[@]}" --num-layers 8 --hidden-size 1024 \
    --num-attention-heads 16 --train-iters 30 --kd-teacher-load "$work/teacher" --kd-steps 20 \
    --kd-weight 0.5 --kd-schedule linear
run_step kd_loss_bench 50 $py benchmarks/gpu_kd_loss.py --tokens 8192 --widths 32768 131072 \
    --reps 3
run_step teacher_overhead 80 $py benchmarks/teacher_overhead.py --layouts 1:1:1 --bf16 \
    --student 12x768x12 --teachers 6x512x8 --vocab 32768 --seq 1024 --mbs 4 --gbs 16 \
    --steps 2 --rounds 2 --reps 3
rm -rf "$work"

{
    echo "== gpu_smoke summary ($(date -u +%Y-%m-%dT%H:%MZ)) =="
    cat "$out/gpu.txt"
    for i in "${!names[@]}"; do
        printf '%-17s exit %-3s %4s s\n' "${names[$i]}" "${codes[$i]}" "${secs[$i]}"
    done
    echo "-- tests:";            tail -n 1 "$out/tests.log"
    echo "-- KD run (steps):";   grep -E "step +[0-9]+/" "$out/kd_run.log" | tail -n 4
    echo "-- KD loss bench:";    grep -iE "ratio|x CE|GB/s|kd_cross_entropy" "$out/kd_loss_bench.log" | tail -n 8
    echo "-- teacher overhead:"; grep -E "^\|" "$out/teacher_overhead.log" | tail -n 4
} | tee "$out/gpu_smoke_summary.txt"

for rc in "${codes[@]}"; do
    [[ $rc == 0 ]] || exit 1
done
exit 0
