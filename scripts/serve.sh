#!/usr/bin/env bash
# Fetches the default model if needed, builds pagedserve (release) and runs `pagedserve serve`
# with the given arguments (default: the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
cargo build --release --quiet --bin pagedserve
target_dir="${CARGO_TARGET_DIR:-$root/target}"
exec "$target_dir/release/pagedserve" serve "$@"
