#!/bin/bash
# On the GPU machine: the split-K settings against main's default on the 8B decode step of 16-64 rows,
# then the one-row merge rule, then 32 served clients under the default and under the split setting
# whose 32-row graph step was shortest. Written for the H200 (issue 11), where cuBLAS's 8B products of
# 32 rows cover too few multiprocessors (BENCHMARKS.md, sessions 23 and 41).
#
#   PAGEDSERVE=/tmp/ps bash scripts/peer/split_ab_device.sh OUTDIR [MODE:SLICES ...]
#
# MODE:SLICES  a PAGEDSERVE_SPLIT_K mode and a PAGEDSERVE_SPLIT_K_SLICES count; default: main's auto:2,
#              then qkv:2 narrow:2 narrow:4 qkv:4 every:2, the six in turn twice over. Files in OUTDIR:
#              bd_split.txt (bench gpu --breakdown-8b-only --batch-sizes 16,32,64 --context 256 per
#              setting, and once with PAGEDSERVE_BLAS_TUNE=on), bd_merge.txt (PAGEDSERVE_FUSED_MERGE=ggml
#              and all, one row, twice), c32_split.jsonl (bench_device.sh's c32=fixed:128:128:256:32 lines,
#              each with its "cfg"); a summary on stdout. PAGEDSERVE_KERNEL_CACHE, if set, holds the
#              binary's compiled kernels.
set -u
ps=${PAGEDSERVE:-target/release/pagedserve}
out=${1:?OUTDIR}; shift
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(auto:2 qkv:2 narrow:2 narrow:4 qkv:4 every:2 auto:2 qkv:2 narrow:2 narrow:4 qkv:4 every:2)
for cfg in "${settings[@]}"; do
  echo "#### PAGEDSERVE_SPLIT_K=${cfg%%:*} PAGEDSERVE_SPLIT_K_SLICES=${cfg##*:}" >> "$out/bd_split.txt"
  PAGEDSERVE_SPLIT_K=${cfg%%:*} PAGEDSERVE_SPLIT_K_SLICES=${cfg##*:} timeout 120 "$ps" bench gpu --breakdown-8b-only \
    --batch-sizes 16,32,64 --context 256 >> "$out/bd_split.txt" 2>&1
  echo "== $cfg"; grep -E '^Llama.* graphs ' "$out/bd_split.txt" | tail -3
done
echo "#### PAGEDSERVE_BLAS_TUNE=on" >> "$out/bd_split.txt"
PAGEDSERVE_BLAS_TUNE=on timeout 120 "$ps" bench gpu --breakdown-8b-only --batch-sizes 16,32,64 --context 256 >> "$out/bd_split.txt" 2>&1
echo "== auto:2, cuBLASLt's timed algorithms"; grep -E '^Llama.* graphs ' "$out/bd_split.txt" | tail -3
for merge in ggml all ggml all; do
  echo "#### PAGEDSERVE_FUSED_MERGE=$merge" >> "$out/bd_merge.txt"
  PAGEDSERVE_FUSED_MERGE=$merge timeout 120 "$ps" bench gpu --breakdown-8b-only --batch-sizes 1 --context 256 >> "$out/bd_merge.txt" 2>&1
  echo "== one row, merge $merge"; grep -E '^Llama.* (graphs|served decode step) ' "$out/bd_merge.txt" | tail -2
done
# The split setting with the shortest mean 32-row graph step, other than the default.
best=$(awk '/^####/ { cfg = "" }
  /^#### PAGEDSERVE_SPLIT_K=/ { split($2, m, "="); split($3, s, "="); cfg = m[2] ":" s[2] }
  /^Llama.* b32 .* graphs / && cfg != "" { sum[cfg] += $10; n[cfg]++ }
  END { for (c in sum) if (c != "auto:2") print sum[c] / n[c], c }' "$out/bd_split.txt" | sort -n | head -1 | cut -d' ' -f2)
echo "== the shortest 32-row graph step but the default's: ${best:-none}"
for cfg in auto:2 ${best:+$best} auto:2 ${best:+$best} auto:2 ${best:+$best}; do
  PAGEDSERVE="$ps" PAGEDSERVE_SPLIT_K=${cfg%%:*} PAGEDSERVE_SPLIT_K_SLICES=${cfg##*:} bash "$here/bench_device.sh" pagedserve \
    llama-3.1-8b c32=fixed:128:128:256:32 2>&1 | sed "s/^{/{\"cfg\":\"$cfg\",/" | tee -a "$out/c32_split.jsonl" | cut -c1-240
done
