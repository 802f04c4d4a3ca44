#!/bin/bash
# Build the pieces that carry vLLM 0.24.0 to the GPU machine (run HERE, not there).
#   bash scripts/peer/vllm/tools/build_pieces.sh /path/to/vllm-0.24.0-cp38-abi3-manylinux_2_28_x86_64.whl
# (scripts/peer/README.md: `pip download` the wheel, then run this.)  PEER_FALLBACK=0 skips the
# optional and fallback pieces (.peer/opt-moe, .peer/fb1, .peer/fb2), which only a failed selftest needs.
# Output: .peer/p1 (the one piece the install needs), .peer/opt-moe (optional MoE
# extension), .peer/fb1 + .peer/fb2 (fallback: the unpruned _C extension), and
# scripts/peer/vllm/pieces.sha256.  Needs: python3.12 with pip, xz, readelf, strip.
set -euo pipefail
WHEEL=${1:?path to the vllm 0.24.0 wheel}
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
HERE=$ROOT/scripts/peer/vllm
PY=${PY:-$(for p in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do "$p" -V >/dev/null 2>&1 && { command -v "$p"; break; }; done)}
B=${BUILD:-/tmp/vllm-peer-build}
PIECE_MAX=$((61 * 1024 * 1024))
rm -rf "$B" && mkdir -p "$B/whl"

# 1. the carried wheels, by name and exact version, for CPython 3.12 x86_64
grep -v '^\s*#' "$HERE/wheels.txt" | sed 's/#.*//' | awk 'NF{print $1}' > "$B/reqs.txt"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_31_x86_64 -d "$B/whl" -r "$B/reqs.txt"

# 2. one --target tree, exactly what `pip install --target /tmp/site` would make there
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$B/site" "$WHEEL" "$B"/whl/*.whl
S=$B/site
rm -rf "$S/bin"                                   # console scripts carry this machine's interpreter path

# 3. drop what a bf16 dense model on one H200 never loads (see README.md, "Left out")
mkdir -p "$B/aside"
mv "$S/vllm/_moe_C_stable_libtorch.abi3.so" "$B/aside/"      # MoE kernels; import is try/except
rm -f  "$S/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"          # FA2; sm_90 picks FA3
rm -f  "$S/vllm/vllm-rs"                                      # Rust frontend, only with VLLM_USE_RUST_FRONTEND=1
rm -rf "$S/vllm/third_party/deep_gemm"                        # FP8 block GEMMs (JIT); not used by bf16
rm -rf "$S/vllm/third_party/fmha_sm100"                       # Blackwell attention
rm -rf "$S/xgrammar/lib"                                      # static library, build-time only
strip --strip-debug "$S/xgrammar/libxgrammar_bindings.so"     # 55 MB of DWARF debug info

# 4. keep only the GPU code an sm_90 GPU loads in _C (see tools/prune_fatbin.py)
cp "$S/vllm/_C_stable_libtorch.abi3.so" "$B/aside/_C_stable_libtorch.abi3.so.orig"
"$PY" "$HERE/tools/prune_fatbin.py" "$B/aside/_C_stable_libtorch.abi3.so.orig" "$S/vllm/_C_stable_libtorch.abi3.so"
"$PY" "$HERE/tools/verify_pruned.py" "$B/aside/_C_stable_libtorch.abi3.so.orig" "$S/vllm/_C_stable_libtorch.abi3.so"
"$PY" "$HERE/tools/prune_fatbin.py" "$B/aside/_moe_C_stable_libtorch.abi3.so" "$B/aside/_moe_C_stable_libtorch.abi3.so.pruned"
"$PY" "$HERE/tools/verify_pruned.py" "$B/aside/_moe_C_stable_libtorch.abi3.so" "$B/aside/_moe_C_stable_libtorch.abi3.so.pruned"

# 5. the archive and its pieces
( cd "$S" && ls -1 ) > "$HERE/manifest.txt"
tar -C "$B" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-06-29 00:00Z' -cf - site \
  | xz -9e -T2 > "$B/vllm-site.tar.xz"
rm -rf "$ROOT/.peer" && mkdir -p "$ROOT/.peer"
( cd "$B" && split -d -a 2 --numeric-suffixes=1 -b $PIECE_MAX vllm-site.tar.xz vllm-site.tar.xz.part- )
n=0
for part in "$B"/vllm-site.tar.xz.part-*; do
  n=$((n + 1)); mkdir -p "$ROOT/.peer/p$n"; mv "$part" "$ROOT/.peer/p$n/"
done
if [ "${PEER_FALLBACK:-1}" = 1 ]; then
# optional MoE extension (pruned the same way), one small piece
xz -9e -T2 -c "$B/aside/_moe_C_stable_libtorch.abi3.so.pruned" > "$B/moe.so.xz"
mkdir -p "$ROOT/.peer/opt-moe" && mv "$B/moe.so.xz" "$ROOT/.peer/opt-moe/_moe_C_stable_libtorch.abi3.so.xz"
# fallback: the untouched _C extension, in two pieces
xz -9e -T2 -c "$B/aside/_C_stable_libtorch.abi3.so.orig" > "$B/C_orig.so.xz"
half=$(( ($(stat -c%s "$B/C_orig.so.xz") + 1) / 2 ))
( cd "$B" && split -d -a 2 --numeric-suffixes=1 -b $half C_orig.so.xz C_orig.so.xz.part- )
mkdir -p "$ROOT/.peer/fb1" "$ROOT/.peer/fb2"
mv "$B/C_orig.so.xz.part-01" "$ROOT/.peer/fb1/"; mv "$B/C_orig.so.xz.part-02" "$ROOT/.peer/fb2/"
fi

# 6. checksums (of every piece, and of the reassembled files)
( cd "$ROOT/.peer" && sha256sum */* | sed 's#  [^/]*/#  #' ) > "$HERE/pieces.sha256"
{ cd "$B"; sha256sum vllm-site.tar.xz; [ ! -f C_orig.so.xz ] || sha256sum C_orig.so.xz
  echo "$(sha256sum < "$B/aside/_C_stable_libtorch.abi3.so.orig" | cut -d' ' -f1)  _C_stable_libtorch.abi3.so.orig"; } \
  >> "$HERE/pieces.sha256"
du -b "$ROOT"/.peer/* | sort -k2
echo "pieces for the install: $n"
