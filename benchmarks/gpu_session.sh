#!/usr/bin/env bash
# One prepared visit to the GPU machine: loader, step and end-to-end figures, each written to
# $OUT as soon as it is measured. Usage (after DALI is unpacked there): bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
run() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40; }
nvidia-smi -L; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
run sample 120 python3 -m mae_fast make-sample-data data/bench --n 4096
run loader 150 python3 -m mae_fast bench-loader configs/bench_vit_base.yaml --backend both --batches 40 --json "$OUT/loader.json"
run step 240 python3 -m mae_fast bench-step configs/bench_vit_base.yaml --steps 30 --compare --json "$OUT/step_b256.json"
run e2e 150 python3 -m mae_fast train configs/bench_vit_base.yaml --max-steps 80 --set schedule.epochs=10 \
    --set logging.print_freq=20 --set logging.output_dir=/tmp/e2e --set checkpointing.checkpoint_dir=/tmp/e2e_ckpt
run step_b512 150 python3 -m mae_fast bench-step configs/bench_vit_base.yaml --steps 20 --batch 512 --json "$OUT/step_b512.json"
run step_ro 150 python3 -m mae_fast bench-step configs/bench_vit_base.yaml --steps 30 --set misc.compile_mode=reduce-overhead --json "$OUT/step_ro.json"
