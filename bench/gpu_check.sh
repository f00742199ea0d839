#!/usr/bin/env bash
# Every GPU check of bench/README.md ("A GPU machine") in one command, each step under its own time limit,
# so that one lease of about 10 minutes measures what it can and a step that hangs or fails costs only itself:
#   bash bench/gpu_check.sh [RESULTS_DIR]        (default bench/results; needs raydae installed with CUDA torch)
# Order: the CUDA tests first (correctness before speed), then DiT MFU plain and compiled, DiT-XL/2 with
# activation checkpointing, the Ray Train ratio, and ingest at 2/4/8/16 workers. Each step's log is kept.
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, note the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - started))s; log $out/$name.log"
    tail -n 12 "$out/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

step gpu_tests 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step mfu_b2 60 python "$here/dit_mfu.py" --device cuda --preset dit_b2_256 --out "$out/dit_mfu-b2.json"
step mfu_b2_compiled 150 python "$here/dit_mfu.py" --device cuda --preset dit_b2_256 --warmup 10 \
    --set generator_train.compile=true --out "$out/dit_mfu-b2-compiled.json"
step mfu_xl2_ckpt 120 python "$here/dit_mfu.py" --device cuda --preset dit_b2_256 --model DiT-XL/2 --steps 10 \
    --set dit.activation_checkpointing=true --out "$out/dit_mfu-xl2-ckpt.json"
step train_overhead 150 python "$here/train_overhead.py" --device cuda --out "$out/train_overhead-gpu.json"
for workers in 2 4 8 16; do
    step "ingest_w$workers" 90 python "$here/ingest.py" --device cuda --workers "$workers" --stage-steps 0 \
        --out "$out/ingest-w$workers.json"
done
echo "steps failed or timed out: $failed"
exit "$failed"
