#!/bin/bash
# On the GPU machine, what a build must pass and show before its served figures mean anything:
# `check` on the tiny Llama fixture with dummy weights (every kernel and the forward against the
# CPU path, over a bf16 and an FP8 cache), then the attention kernels alone (`bench gpu
# --attention-only`, both caches) and the 8B decode step broken down by kind of launch at 1, 32
# and 256 rows over each cache. One file per part in OUTDIR; a summary line per part on stdout;
# exit status 1 if `check` failed.
#
#   PAGEDSERVE=/tmp/ps bash scripts/peer/verify_device.sh OUTDIR [BATCH_SIZES] [CONTEXT]
#
# PAGEDSERVE_KERNEL_CACHE, if set, holds the binary's compiled kernels (NVRTC otherwise compiles
# them on the first run, about a minute).
set -u
ps=${PAGEDSERVE:-target/release/pagedserve}
out=${1:?OUTDIR}; batches=${2:-1,32,256}; context=${3:-512}
mkdir -p "$out"
status=0
"$ps" check --device cuda --model tests/fixtures/gpu/llama --load-format dummy > "$out/check.txt" 2>&1 || status=1
echo "check: $(grep -E '^[0-9]+ passed' "$out/check.txt" || tail -1 "$out/check.txt")"
grep -E ' NO ' "$out/check.txt" | head -20
"$ps" bench gpu --attention-only > "$out/attention.txt" 2>&1
echo "attention: $(grep -c '^paged attention\|^prefill attention' "$out/attention.txt") rows"
for cache in auto fp8; do
  "$ps" bench gpu --breakdown-8b-only --batch-sizes "$batches" --context "$context" --kv-cache-dtype "$cache" > "$out/breakdown_$cache.txt" 2>&1
  grep 'graphs' "$out/breakdown_$cache.txt"
done
exit $status
