#!/usr/bin/env bash
# The CUDA kernels' CPU emulators (kernels/emulate/*.py): each replays one kernel's fragment and
# index arithmetic lane by lane in numpy against plain float64 attention or products, so a wrong
# permutation or mask fails on a machine without a GPU. numpy is installed with pip into
# target/pyemulate (pinned; no virtual environment needed); idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/target/pyemulate"
source "$root/scripts/pip-target.sh"
pip_target "$dest" numpy 2.4.6
cd "$root/kernels/emulate"
for emulator in *.py; do
  [[ "$emulator" == fragments.py ]] && continue  # the helpers they share
  echo "== $emulator"
  PYTHONPATH="$dest" python3 "$emulator"
done
