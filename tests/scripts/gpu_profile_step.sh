#!/usr/bin/env bash
# On the GPU machine, after tests/scripts/gpu_decode_bench.sh has unpacked .carry/ and .gl/: the kernels of one
# decoding step, each launch timed on the device by CubeCL's profiler (--no-graphs: recorded launches are not
# logged), as the difference between 12- and 4-step runs.
#   bash tests/scripts/gpu_profile_step.sh SHAPE PRECISION BATCH [BATCH ...]     (profile-SHAPE-DEVICE-bBATCH.txt in $OUT)
# DEVICE picks the backend as in gpu_decode_bench.sh.
set -euo pipefail
shape="$1" precision="$2"
shift 2
. tests/scripts/gpu_env.sh
logs="$(mktemp -d)"
for batch in "$@"; do
  for new in 4 12; do
    CUBECL_DEBUG_LOG="$logs/$batch-$new.log" CUBECL_DEBUG_OPTION=profile .carry/avb bench decode --shape "$shape" \
      --device "$device" --precision "$precision" --batch "$batch" --prompt 128 --new "$new" --reps 1 --reference none \
      --no-graphs --output "$logs/$batch-$new.md" >/dev/null 2>&1
  done
  python3 tests/scripts/profile_decode_step.py "$logs/$batch-4.log" "$logs/$batch-12.log" |
    tee "$OUT/profile-$shape-$device-b$batch.txt"
done
