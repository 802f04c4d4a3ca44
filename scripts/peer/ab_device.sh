#!/bin/bash
# An A/B of two pagedserve binaries in one lease: the same workloads, alternating A, B, A, B, ...,
# so that both see the same machine and neither gets only the warm or only the cold half. One
# JSON line per workload and run (bench_device.sh's), labelled with the run, on stdout.
#
#   bash scripts/peer/ab_device.sh BIN_A BIN_B SHAPE ROUNDS WORKLOAD...
#
# BIN_A, BIN_B  the two binaries (both compiled kernels in $PAGEDSERVE_KERNEL_CACHE, if set)
# SHAPE         as bench_device.sh's (smollm2-135m, llama-3.2-1b, llama-3.1-8b)
# ROUNDS        how many times each binary runs the workloads (A then B, each round)
# WORKLOAD      as bench_device.sh's, e.g. sg=sharegpt:1000:1000
# PS_EXTRA and the rest of bench_device.sh's environment apply to both. Example:
#   bash scripts/peer/ab_device.sh /tmp/ps_old /tmp/ps smollm2-135m 2 sg=sharegpt:1000:1000
set -u
a=${1:?BIN_A}; b=${2:?BIN_B}; shape=${3:?SHAPE}; rounds=${4:?ROUNDS}; shift 4
[ $# -gt 0 ] || { echo "no workload given" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
status=0
for round in $(seq 1 "$rounds"); do
  for side in A B; do
    bin=$a; [ "$side" = B ] && bin=$b
    PAGEDSERVE=$bin bash "$here/bench_device.sh" pagedserve "$shape" "$@" | while IFS= read -r line; do
      # Tag each result with its side and round (bench_device.sh's lines are JSON objects).
      case "$line" in
        "{"*) printf '{"ab":"%s","round":%s,%s\n' "$side" "$round" "${line#\{}" ;;
        *) printf '%s\n' "$line" ;;
      esac
    done
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
done
exit $status
