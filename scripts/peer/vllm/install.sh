#!/bin/bash
# Install vLLM 0.24.0 into /tmp/site on the GPU machine, from the pieces that the run(s)
# copied into /tmp/peer-pieces (see README.md). Run from the repository root:
#   bash scripts/peer/vllm/install.sh [--skip-selftest]
# It verifies every piece, unpacks the tree with Python's own lzma (no xz/zstd binary
# needed), applies the optional MoE / fallback-_C pieces when present, prints
# vllm.__version__, and runs selftest.py (imports, FA3 choice, GPU kernel checks).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PIECES=${PIECES:-/tmp/peer-pieces}
SITE=/tmp/site
die() { echo "INSTALL FAILED: $*"; exit 1; }

[ -d "$PIECES" ] || die "no $PIECES: copy .peer/p1/* there first"
cd "$PIECES" || die "cd $PIECES"
# 1. every piece that is here must match its checksum; the install pieces must all be here
bad=0; parts=()
while read -r sum name; do
  [ -f "$name" ] || continue
  if [ "$(sha256sum "$name" | cut -d' ' -f1)" != "$sum" ]; then echo "checksum mismatch: $name"; bad=1; fi
done < "$HERE/pieces.sha256"
[ $bad -eq 0 ] || die "corrupt piece(s) above: copy them again"
for name in $(awk '{print $2}' "$HERE/pieces.sha256" | grep '^vllm-site\.tar\.xz\.part-' | sort); do
  [ -f "$name" ] || die "missing $name (it comes with one of the .peer/pN folders; the machine may have gone cold between runs)"
  parts+=("$name")
done
echo "pieces ok: ${parts[*]}"

# 2. unpack into /tmp/site, replacing only the packages this archive brings
mkdir -p "$SITE"
while read -r top; do
  [ -n "$top" ] || continue
  rm -rf "${SITE:?}/$top"
  case "$top" in *.dist-info) rm -rf "${SITE:?}/${top%%-[0-9]*}"-[0-9]*.dist-info ;; esac  # any other version
done < "$HERE/manifest.txt"
cat "${parts[@]}" | python3 -c '
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz") as t:
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    t.extractall("/tmp", **kw)
' || die "unpacking failed"
echo "unpacked into $SITE: $(du -sh "$SITE" | cut -f1)"

# 3. optional pieces: the MoE extension, and the unpruned _C (fallback)
if [ -f _moe_C_stable_libtorch.abi3.so.xz ]; then
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
    _moe_C_stable_libtorch.abi3.so.xz "$SITE/vllm/_moe_C_stable_libtorch.abi3.so" && echo "installed optional MoE extension"
fi
if [ -f C_orig.so.xz.part-01 ] && [ -f C_orig.so.xz.part-02 ]; then
  cat C_orig.so.xz.part-01 C_orig.so.xz.part-02 | python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open(sys.argv[1],"wb"))' \
    "$SITE/vllm/_C_stable_libtorch.abi3.so" && echo "installed the UNPRUNED _C extension (fallback)"
fi

# 4. report
cd "$HERE/../../.." || exit 1
source "$HERE/env.sh"
python3 -c 'import vllm; print("vllm", vllm.__version__, "from", vllm.__file__)' || die "import vllm"
awk '$2 == "vllm-site.tar.xz" {print $1}' "$HERE/pieces.sha256" > "$SITE/.peer-build-id"
if [ "${1:-}" != "--skip-selftest" ]; then
  python3 "$HERE/selftest.py" || die "selftest (output above)"
fi
echo "INSTALL OK: source scripts/peer/vllm/env.sh, then scripts/peer/vllm/serve.sh CONFIG_DIR PORT"
