#!/usr/bin/env bash
# Prepares a fresh machine for building, testing and serving pagedserve: fetches and checks the
# default model, builds the Wasm plugins. Idempotent and quiet when everything is already in place.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/fetch-model.sh" >/dev/null
"$root/scripts/build-plugins.sh"
