#!/usr/bin/env bash
# The CUDA kernels' CPU emulators (kernels/emulate/*.py): each replays one kernel's fragment and
# index arithmetic lane by lane in numpy against plain float64 attention or products, so a wrong
# permutation or mask fails on a machine without a GPU. numpy is installed with pip into
# target/pyemulate (pinned; no virtual environment needed); idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/target/pyemulate"
version="2.4.6"
if [[ ! -f "$dest/.complete-$version" ]]; then
  echo "installing numpy==$version into $dest ..." >&2
  rm -rf "$dest"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$dest" "numpy==$version" >&2
  touch "$dest/.complete-$version"
fi
cd "$root/kernels/emulate"
for emulator in *.py; do
  [[ "$emulator" == fragments.py ]] && continue  # the helpers they share
  echo "== $emulator"
  PYTHONPATH="$dest" python3 "$emulator"
done
