#!/usr/bin/env bash
# The official OpenAI Python client, for the client round-trip test (tests/clients/), installed
# with pip into target/pyclient (no virtual environment or system packages needed; put it on
# PYTHONPATH). Pinned; idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/pip-target.sh"
pip_target "$root/target/pyclient" openai 3.57.0
