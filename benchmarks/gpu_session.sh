#!/usr/bin/env bash
# One prepared visit to the GPU machine (after DALI is unpacked there, see shared/device/README.md),
# in stages that each fit one device call (under 600 s), in the order they matter; each result is
# written to $OUT as soon as it is measured. Pass the git sha along and keep one log:
#   MAE_FAST_GIT_SHA=<sha> STAGE=core bash benchmarks/gpu_session.sh 2>&1 | tee $OUT/core.log
#
#   core      sample data, then the whole harness for ViT-B (loaders, step vs the reference step,
#             end to end vs the official PIL + eager loop)                             about 5 min
#   variants  the step's performance switches against the config's step, same run    about 6 min
#   extra     the GPU tests; end to end with batch 512 and the decoder on the hardware JPEG
#             engines; the ViT-L harness                                               about 8 min
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
run() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | grep -v 'nvjpeg2k\|nvtiff\|nvImageCodec'; }
B="python3 -m mae_fast"
STAGE=${STAGE:-core}
nvidia-smi -L; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
run sample 120 $B make-sample-data data/bench --n 4096

if [ "$STAGE" = core ]; then
run bench 420 $B bench configs/bench_vit_base.yaml --steps 30 --batches 40 --out-dir "$OUT"
fi

if [ "$STAGE" = variants ]; then
run step_variants 560 $B bench-step configs/bench_vit_base.yaml --steps 15 --warmup 3 \
  --variant model.embed_kept_only=true --variant misc.compile_optimizer=true --variant misc.attention=cudnn \
  --variant model.grad_checkpointing=true --json "$OUT/step_variants.json"
fi

if [ "$STAGE" = extra ]; then
run gpu_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests
# end to end at batch 512, decode on the GPU's JPEG engines only (hw_decoder_load 1.0) and as configured
for hw in 1.0 0.65; do
run "e2e_b512_hw$hw" 150 $B train configs/bench_vit_base.yaml --max-steps 40 --set optimization.batch_size=512 \
  --set optimization.micro_batch_size=512 --set data.hw_decoder_load=$hw --set logging.print_freq=10 \
  --set logging.dashboard=off --set logging.output_dir=/tmp/e2e_$hw --set checkpointing.checkpoint_dir=/tmp/e2e_ck_$hw \
  --set checkpointing.save_freq_steps=0 --set checkpointing.save_freq_epochs=0 --set schedule.epochs=100
done
run bench_vitl 300 $B bench configs/bench_vit_large.yaml --steps 20 --batches 20 --out-dir "$OUT"
fi
