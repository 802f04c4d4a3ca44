#!/usr/bin/env bash
# The whole test suite: set-up (model), the Wasm plugins (built for wasm32-wasip2, their logic
# unit-tested natively), then every unit and end-to-end test of the host, built optimized (the
# tests run the real model on the CPU and the real plugin components). NVRTC comes from PyPI so
# that the CUDA kernels are compiled for sm_90 on every run, GPU or not; the OpenAI Python client
# too, for the client round-trip test, and Chromium with Selenium for the web page's browser test;
# numpy for the kernels' CPU emulators (scripts/emulate-kernels.sh); ptxas and cuobjdump, also from
# PyPI, to assemble every kernel for sm_90 and lint its machine code (scripts/sass-check.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# The builds need about 6 GB (the test suite's ~2 GB, the fuzz build's ~3 GB, the plugins' ~1 GB);
# say up front what the disk has, so that a run that fills it is plain from its log.
echo "test.sh: free disk: $(df -h --output=avail "$root" | tail -1 | tr -d ' ')" >&2
./scripts/setup.sh
(cd plugins && cargo test --quiet)
eval "$(./scripts/fetch-nvrtc.sh)"
./scripts/fetch-pyclient.sh
./scripts/fetch-browser.sh
./scripts/emulate-kernels.sh
export PAGEDSERVE_REQUIRE_NVRTC=1 PAGEDSERVE_KERNEL_CACHE="$root/target/kernel-cache"
cargo test --release --workspace "$@"
./scripts/sass-check.sh "$root/target/release/pagedserve"
# A fixed pass of every fuzz target (the same inputs every run: see scripts/fuzz.sh).
./scripts/fuzz.sh --runs 100000
