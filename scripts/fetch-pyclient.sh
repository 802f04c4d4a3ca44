#!/usr/bin/env bash
# The official OpenAI Python client, for the client round-trip test (tests/clients/), installed
# with pip into target/pyclient (no virtual environment or system packages needed; put it on
# PYTHONPATH). Pinned; idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/target/pyclient"
version="3.57.0"
if [[ ! -f "$dest/.complete-$version" ]]; then
  echo "installing openai==$version into $dest ..." >&2
  rm -rf "$dest"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$dest" "openai==$version" >&2
  touch "$dest/.complete-$version"
fi
