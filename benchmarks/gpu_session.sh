#!/usr/bin/env bash
# One prepared visit to the GPU machine (after DALI is unpacked there, see shared/device/README.md),
# in stages that each fit one device call: a stage's time limits add up to at most 560 s (a call
# may run 600 s; core leaves room for unpacking DALI in the same call). Stages in the order they
# matter; 15 minutes of device time hold the staging, core and about one more. Each result is logged (and written to $OUT) as soon as it is measured,
# and each command's exit status is logged (124: it hit its time limit). Pass the git sha along:
#   MAE_FAST_GIT_SHA=<sha> STAGE=core bash benchmarks/gpu_session.sh 2>&1 | tee $OUT/core.log
#
#   core      sample data; the whole harness for ViT-B: loaders (DALI, PIL), the step (mae-fast, the
#             official engine's, the compiled reference), end to end (the official PIL + eager
#             loop, the compiled reference fed by DALI, mae-fast's train loop); end to end with
#             the step on a high-priority CUDA stream                                  about 7 min
#   variants  the step's performance switches against the config's step, same run, and a profile;
#             end to end at batch 512                                                  about 8 min
#   tests     the GPU tests; end to end at batch 512 with JPEG decoding on the hardware engines
#             only, and with uint8 batches                                             about 7 min
#   vitl      the whole harness for ViT-L                                              about 7 min
#   autotune  the step compiled with max-autotune (Inductor's GEMM tuning) against the default
#                                                                                      up to 9 min
#   memory    gradient checkpointing against the default step: speed and peak memory   about 3 min
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
run() {
  local name=$1 limit=$2; shift 2; echo "=== $name"
  timeout "$limit" "$@" 2>&1 | grep -v 'nvjpeg2k\|nvtiff\|nvImageCodec'; echo "=== $name rc=${PIPESTATUS[0]}"
}
B="python3 -m mae_fast"
# end to end: mae-fast's train loop on the sample JPEGs, 40 steps, its log lines give img/s and data wait
e2e() { local name=$1; shift; run "$name" 100 $B train configs/bench_vit_base.yaml --max-steps 40 \
  --set logging.print_freq=10 --set logging.dashboard=off --set "logging.output_dir=/tmp/$name" \
  --set "checkpointing.checkpoint_dir=/tmp/$name-ckpt" --set checkpointing.save_freq_steps=0 \
  --set checkpointing.save_freq_epochs=0 --set schedule.epochs=100 "$@"; }
B512="--set optimization.batch_size=512 --set optimization.micro_batch_size=512"
STAGE=${STAGE:-core}
nvidia-smi -L; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
run sample 60 $B make-sample-data data/bench --n 4096

if [ "$STAGE" = core ]; then
run bench 380 $B bench configs/bench_vit_base.yaml --steps 30 --batches 40 --out-dir "$OUT"
e2e e2e_high_priority_stream --set misc.high_priority_stream=true
fi

if [ "$STAGE" = variants ]; then
run step_variants 390 $B bench-step configs/bench_vit_base.yaml --steps 15 --warmup 3 \
  --variant model.embed_kept_only=true --variant misc.compile_optimizer=true --variant misc.attention=cudnn \
  --variant misc.precision=bf16 --json "$OUT/step_variants.json" --profile "$OUT/step_profile.txt"
e2e e2e_b512 $B512
fi

if [ "$STAGE" = tests ]; then
run gpu_tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests
e2e e2e_b512_hw1 $B512 --set data.hw_decoder_load=1.0
e2e e2e_uint8 --set data.output_dtype=uint8    # 60+240+2x100 = 500 s at most
fi

if [ "$STAGE" = vitl ]; then
run bench_vitl 490 $B bench configs/bench_vit_large.yaml --steps 20 --batches 20 --out-dir "$OUT"
fi

if [ "$STAGE" = autotune ]; then
run step_autotune 490 $B bench-step configs/bench_vit_base.yaml --steps 15 --warmup 3 \
  --variant misc.compile_mode=max-autotune-no-cudagraphs --json "$OUT/step_autotune.json"
fi

if [ "$STAGE" = memory ]; then
run step_checkpointing 300 $B bench-step configs/bench_vit_base.yaml --steps 15 --warmup 3 \
  --variant model.grad_checkpointing=true --json "$OUT/step_checkpointing.json"
fi
