#!/usr/bin/env bash
# Prepares this (Debian 12) machine to compile the `cuda` feature. Source it as root: `. tests/scripts/cuda_build_env.sh`.
#
# burn's CUDA backend (cubecl-cuda 0.11) always links CubeCL's LLVM compiler, and that crate's build
# (tracel-llvm-bundler) downloads an LLVM 23.1 bundle from GitHub, which this network cannot reach. avbridge runs
# CubeCL's other CUDA compiler (CUDA C++ through NVRTC, the `cpp` feature that shaders/Cargo.toml turns on), so the
# LLVM compiler is linked but never called; Debian's LLVM 22 static libraries satisfy the link. The bundler skips
# its download when its install folder holds a sentinel file, and reads everything else through that folder's
# `bin/llvm-config`, so the folder is a sentinel plus a wrapper of Debian's llvm-config. The wrapper leaves z3 and
# libxml2 out of the system libraries: nothing linked here uses them (the binaries' NEEDED entries are libc, libm,
# libstdc++, libgcc_s, zlib and zstd), and Debian names z3 by a path that the bundler turns into `-llibz3`.
#
# cudarc picks its CUDA API version from `nvcc`, else the newest it knows (13.4): the GPU machine's driver is CUDA
# 13.0, hence CUDARC_CUDA_VERSION. The binaries load the CUDA driver and NVRTC at run time (nothing CUDA is needed
# here); tests/scripts/gpu_decode_bench.sh with DEVICE=cuda finds them on the GPU machine.
llvm=/usr/lib/llvm-22
if [ ! -x "$llvm/bin/llvm-config" ] || [ ! -f "$llvm/lib/libPolly.a" ] || [ ! -e /usr/include/zstd.h ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends llvm-22-dev \
    libpolly-22-dev libzstd-dev || return 1
fi
prefix="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
mkdir -p "$prefix/bin" && rm -f "$prefix/bin/llvm-config" || return 1
printf '%s\n' '#!/bin/sh' \
  "out=\$($llvm/bin/llvm-config \"\$@\") || exit \$?" \
  'case " $* " in' \
  "  *\" --system-libs \"*) printf '%s\\n' \"\$out\" | sed -e 's# [^ ]*libz3[^ ]*##' -e 's# -lxml2##' ;;" \
  "  *) printf '%s\\n' \"\$out\" ;;" \
  'esac' >"$prefix/bin/llvm-config" || return 1
chmod +x "$prefix/bin/llvm-config" || return 1
# Touched only once: the bundler's build script reruns (and everything above it rebuilds) when its mtime changes.
[ -e "$prefix/.tracel-llvm-installed" ] || touch "$prefix/.tracel-llvm-installed" || return 1
unset llvm prefix
export CUDARC_CUDA_VERSION=13000
