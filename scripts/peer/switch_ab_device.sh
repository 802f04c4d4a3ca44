#!/bin/bash
# On the GPU machine: one binary under several settings of its environment switches (an experiment
# against the default), on the 8B one-row step: for each setting the decode step broken down
# (`bench gpu --breakdown-8b-only --batch-sizes 1 --context 512 --omissions`, graphs for the
# bench's 528 positions and for the server's 2048), then ROUNDS served one-client runs of each
# setting in turn (A, B, ..., A, B, ...). One file per breakdown and one JSON-lines file of the
# served results in OUTDIR (each result after a {"setting": ...} line); a summary on stdout.
#
#   PAGEDSERVE=/tmp/ps bash scripts/peer/switch_ab_device.sh OUTDIR ROUNDS SETTING...
#
# SETTING  space-separated VAR=value pairs, or "default" for none. Example:
#   bash scripts/peer/switch_ab_device.sh /tmp/ab 2 default PAGEDSERVE_FUSED_MERGE=all \
#        "PAGEDSERVE_PDL=gemv-attention PAGEDSERVE_FUSED_MERGE=all"
# PAGEDSERVE_KERNEL_CACHE, if set, holds the binary's compiled kernels.
set -u
ps=${PAGEDSERVE:-target/release/pagedserve}
out=${1:?OUTDIR}; rounds=${2:?ROUNDS}; shift 2
[ $# -gt 0 ] || { echo "no setting given" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
settings=("$@")
vars() { [ "$1" = default ] && echo "" || echo "$1"; }
for i in "${!settings[@]}"; do
  for context in 528 2048; do
    file="$out/breakdown_s${i}_g${context}.txt"
    # shellcheck disable=SC2046
    env $(vars "${settings[$i]}") timeout 120 "$ps" bench gpu --breakdown-8b-only --batch-sizes 1 --context 512 \
      --graph-context "$context" --omissions > "$file" 2>&1
    echo "== [${settings[$i]}] graphs for $context positions (rc $?)"
    grep -E 'graphs|without|served decode' "$file"
  done
done
for round in $(seq 1 "$rounds"); do
  for i in "${!settings[@]}"; do
    echo "{\"setting\":\"${settings[$i]}\",\"round\":$round}" >> "$out/served_one.jsonl"
    # shellcheck disable=SC2046
    env $(vars "${settings[$i]}") PAGEDSERVE="$ps" timeout 120 bash "$here/bench_device.sh" pagedserve llama-3.1-8b one=fixed:128:256:8:1 \
      2>&1 | tee -a "$out/served_one.jsonl" | grep -oE '"(tpot_ms_p50|output_tok_per_s|ttft_ms_p50)": [^,]*' | tr '\n' ' ' \
      | sed "s/^/[${settings[$i]}] round $round: /"; echo
  done
done
