#!/usr/bin/env bash
# NVRTC and the CUDA headers, from NVIDIA's PyPI wheels (no GPU, no CUDA toolkit needed): what
# compiling the kernels takes (`pagedserve check --compile-only sm_90`, and the kernel-compile
# test that `scripts/test.sh` makes mandatory). Unpacked once under target/nvrtc; idempotent.
# Prints the environment to `eval`: LD_LIBRARY_PATH (libnvrtc) and CUDA_HOME (cuda_bf16.h).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/target/nvrtc"
wheels=("nvidia-cuda-nvrtc-cu12==12.9.86" "nvidia-cuda-runtime-cu12==12.9.79")

source "$root/scripts/pip-target.sh"
pip_wheels "$dest" "${wheels[@]}"
ln -sf libnvrtc.so.12 "$dest/nvidia/cuda_nvrtc/lib/libnvrtc.so"
echo "export LD_LIBRARY_PATH=\"$dest/nvidia/cuda_nvrtc/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export CUDA_HOME=\"$dest/nvidia/cuda_runtime\""
