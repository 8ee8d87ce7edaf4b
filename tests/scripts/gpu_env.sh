# Sourced by the GPU machine's scripts: the driver paths for DEVICE (wgpu, the default, or cuda). wgpu reaches the
# NVIDIA driver through Vulkan; a `cuda` build compiles its kernels at run time as CUDA C++ with the NVRTC that the
# machine's CUDA toolkit (or its Python CUDA packages) carries, and the toolkit's headers from CUDA_PATH.
device="${DEVICE:-wgpu}"
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
if [ "$device" = cuda ]; then
  export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
  site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)"
  nvrtc="$(find "$CUDA_PATH/" "$site/nvidia/" -name 'libnvrtc.so*' 2>/dev/null | head -1 || true)"
  if [ -n "$nvrtc" ]; then
    export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "gpu_env.sh: no libnvrtc.so under $CUDA_PATH or $site/nvidia: set CUDA_PATH to the CUDA toolkit" >&2
  fi
fi
export AVB_REPO_ROOT="$PWD" AVB_TEST_DEVICE="$device"
