#!/usr/bin/env bash
# NVRTC and the CUDA headers, from NVIDIA's PyPI wheels (no GPU, no CUDA toolkit needed): what
# compiling the kernels takes (`pagedserve check --compile-only sm_90`, and the kernel-compile
# test that `scripts/test.sh` makes mandatory). Unpacked once under target/nvrtc; idempotent.
# Prints the environment to `eval`: LD_LIBRARY_PATH (libnvrtc) and CUDA_HOME (cuda_bf16.h).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/target/nvrtc"
wheels=("nvidia-cuda-nvrtc-cu12==12.9.86" "nvidia-cuda-runtime-cu12==12.9.79")

if [[ ! -f "$dest/.complete" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "fetching ${wheels[*]} from PyPI ..." >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$work" "${wheels[@]}" >&2
  rm -rf "$dest"
  mkdir -p "$dest"
  python3 - "$dest" "$work"/*.whl <<'PY'
import sys, zipfile
dest, *wheels = sys.argv[1:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
PY
  ln -sf libnvrtc.so.12 "$dest/nvidia/cuda_nvrtc/lib/libnvrtc.so"
  touch "$dest/.complete"
fi
echo "export LD_LIBRARY_PATH=\"$dest/nvidia/cuda_nvrtc/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export CUDA_HOME=\"$dest/nvidia/cuda_runtime\""
