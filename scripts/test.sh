#!/usr/bin/env bash
# The whole test suite: set-up (model), then every unit and end-to-end test, built optimized
# (the tests run the real model on the CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
cargo test --release --workspace "$@"
