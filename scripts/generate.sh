#!/usr/bin/env bash
# Fetches the default model if needed, builds pagedserve (release) and runs `pagedserve generate`
# with the given arguments.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
cargo build --release --quiet --bin pagedserve
exec ./target/release/pagedserve generate "$@"
