#!/usr/bin/env bash
# One prepared visit to the GPU machine (after DALI is unpacked there, see shared/device/README.md):
# the whole harness for ViT-B, then the performance switches, each result written to $OUT as soon
# as it is measured. Cheap checks first, compile-heavy ones last. Pass the git sha along:
#   MAE_FAST_GIT_SHA=<sha> STAGE=core bash benchmarks/gpu_session.sh    (about 6 min)
#   MAE_FAST_GIT_SHA=<sha> STAGE=extra bash benchmarks/gpu_session.sh   (about 8 min; a second call)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# one log for all (the device tool returns at most 8 files): bash benchmarks/gpu_session.sh 2>&1 | tee $OUT/session.log
run() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | grep -v 'nvjpeg2k\|nvtiff\|nvImageCodec'; }
B="python3 -m mae_fast"
STAGE=${STAGE:-core}
nvidia-smi -L; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
run sample 120 $B make-sample-data data/bench --n 4096
if [ "$STAGE" = core ]; then
run gpu_tests 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests
# the harness: loaders, step (reference vs mae-fast), end to end (PIL + eager vs DALI + compiled)
run bench 300 $B bench configs/bench_vit_base.yaml --steps 30 --batches 40 --out-dir "$OUT"
fi
if [ "$STAGE" = extra ]; then
# switches, one JSON each
run dali_cpudec 60 $B bench-loader configs/bench_vit_base.yaml --backend dali --set data.decoder=cpu
run dali_hw90 60 $B bench-loader configs/bench_vit_base.yaml --backend dali --set data.hw_decoder_load=0.9 --json "$OUT/loader_hw90.json"
run step_profile 150 $B bench-step configs/bench_vit_base.yaml --steps 10 --profile "$OUT/step_profile.txt"
run step_b512 150 $B bench-step configs/bench_vit_base.yaml --steps 20 --batch 512 --json "$OUT/step_b512.json"
run step_vitl 240 $B bench-step configs/bench_vit_large.yaml --steps 20 --compare --json "$OUT/step_vitl.json"
run step_gc 150 $B bench-step configs/bench_vit_base.yaml --steps 20 --set model.grad_checkpointing=true --json "$OUT/step_gc.json"
fi
