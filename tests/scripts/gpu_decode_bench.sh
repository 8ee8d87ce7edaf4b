#!/usr/bin/env bash
# On the GPU machine (device tool): avbridge's kernels checked against burn's generic ops on the real GPU through
# wgpu/Vulkan (the kernels test binary, when carried), their timings (the kernels bench binary), then `avb bench decode` for the given shapes (random weights of the released AVs' shapes) against
# transformers (bf16, sdpa) in the same run. Binaries are built here and carried gzipped or xz-compressed in .carry/ (see
# docs/performance.md for the build commands); Vulkan loaders in .gl/ (the device tool's recipe).
#   bash tests/scripts/gpu_decode_bench.sh PRECISION SHAPE [SHAPE ...]     (tables land in $OUT)
# BATCHES (default 1,16,64) picks the batch sizes, REPS (default 3) the timed runs each side takes the median of: a
# process's first timed run can start slow (a batch-1 prefill of 0.113 s against 0.025 for the next two). ARGS adds
# arguments to `avb bench decode` (e.g. "--temperature 0.7 --top-p 0.9"), TAG a suffix to the tables' names, DEVICE
# the backend (wgpu, the default, or cuda with a `cuda` build's binaries: tests/scripts/gpu_env.sh).
set -uo pipefail
precision="$1"
shift
shopt -s nullglob
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
. tests/scripts/gpu_env.sh
for f in .carry/*.gz; do gunzip -kf "$f"; done
for f in .carry/*.xz; do xz -dkf "$f"; done
chmod +x .carry/avb .carry/kernels .carry/kbench 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1
if [ -x .carry/kernels ]; then
  .carry/kernels --nocapture --test-threads 1 2>&1 | grep -E "relative error|test result|panicked|FAILED" | tee "$OUT/kernels.log"
fi
if [ -x .carry/kbench ]; then
  .carry/kbench 2>&1 | grep -v XDG_RUNTIME | tee "$OUT/kernel-bench.md"
fi
for shape in "$@"; do
  .carry/avb bench decode --shape "$shape" --device "$device" --precision "$precision" --batch "${BATCHES:-1,16,64}" \
    --prompt 128 --new 128 --reps "${REPS:-3}" ${ARGS:-} --output "$OUT/decode-$shape-$device-$precision${TAG:+-$TAG}.md" 2>&1 |
    grep -v XDG_RUNTIME | tee "$OUT/decode-$shape-$device-$precision${TAG:+-$TAG}.log"
done
