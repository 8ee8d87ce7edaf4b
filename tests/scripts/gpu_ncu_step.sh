#!/usr/bin/env bash
# On the GPU machine, with a `cuda` build's avb in .carry/ (gpu_decode_bench.sh's recipe): Nsight Compute's view of
# a decoding step's kernels (speed of light, memory workload, occupancy, launch statistics, warp states) for 9
# launches of the products, chunk sums, RoPE and attention from the third step on, every kernel launched
# (--no-graphs). ncu runs them at its base clocks (SM 1.35-1.47 GHz, not the 1.98 of a free run), so their
# durations are longer than in the decode tables; the fractions of each unit's peak are what it is for.
#   bash tests/scripts/gpu_ncu_step.sh SHAPE PRECISION BATCH [BATCH ...]   (ncu-SHAPE-cuda-bBATCH.txt in $OUT)
set -uo pipefail
shape="$1" precision="$2"
shift 2
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" != cuda ]; then
  echo "gpu_ncu_step.sh: Nsight Compute profiles CUDA kernels; DEVICE=$DEVICE has none" >&2
  exit 2
fi
. tests/scripts/gpu_env.sh
for f in .carry/*.xz; do [ -e "$f" ] && xz -dkf "$f"; done
chmod +x .carry/avb
ncu="$(command -v ncu || echo "$CUDA_PATH/bin/ncu")"
for batch in "$@"; do
  "$ncu" --kernel-name regex:'qmatvec_row|qmatmul_mma|decode_attention|sum_chunks|rope_into_cache' \
    --launch-skip 700 --launch-count 9 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats \
    .carry/avb bench decode --shape "$shape" --device "$device" --precision "$precision" --batch "$batch" \
    --prompt 128 --new 8 --reps 1 --reference none --no-graphs --output /tmp/ncu-step.md 2>&1 |
    grep -v XDG_RUNTIME | sed "s#$PWD/##g" >"$OUT/ncu-$shape-$device-b$batch.txt"
done
