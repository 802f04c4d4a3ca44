#!/usr/bin/env bash
# Builds every plugin of the `plugins/` workspace (examples, and the hostile ones the tests use)
# for wasm32-wasip2 in release, and copies the components to plugins/dist/<crate-name>.wasm.
# A wasm32-wasip2 cdylib is a component already (rustc links it with wasm-component-ld), so no
# other tool is needed. Idempotent; cargo rebuilds only what changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/plugins"
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
cargo build --release --quiet --target wasm32-wasip2
# Where cargo put them (honours CARGO_TARGET_DIR and .cargo/config).
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
out="$target_dir/wasm32-wasip2/release"
mkdir -p dist
crates=$(cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if any("cdylib" in t["crate_types"] for t in p["targets"]):
        print(p["name"])')
for crate in $crates; do
  cp -f "$out/${crate//-/_}.wasm" "dist/$crate.wasm"
done
echo "plugins built: $(ls dist | tr '\n' ' ')" >&2
