#!/bin/bash
# On the GPU machine: Nsight Compute's hardware counters for chosen kernels of any pagedserve
# command (usually `bench gpu`), and one summary line per profiled kernel on stdout: time, DRAM
# bytes and rate, achieved occupancy, issue activity and the largest warp stall reasons. What a
# kernel is bound by, where event timings only say how long it took.
#
#   PAGEDSERVE=/tmp/ps bash scripts/peer/profile_device.sh OUTDIR LABEL KERNEL_REGEX SKIP COUNT -- ARGS...
#
# KERNEL_REGEX  which kernels (ncu's `-k regex:`), e.g. 'gemv_q4_k' or 'gemv|paged_attention'
# SKIP, COUNT   matching launches to pass over (warm-up, the first steps), then to profile
# ARGS          the pagedserve command, e.g. bench gpu --quantized-only --llama-8b --ggml q4_k --batch-sizes 1
#
# Writes OUTDIR/LABEL.ncu-rep (open it in Nsight Compute) and OUTDIR/LABEL.csv (the raw page).
# ncu serializes the launches and replays each kernel once per counter pass, flushing the caches
# before each (its default), so a profiled kernel runs alone and cold: programmatic dependent
# launches do not overlap, and the times are the kernel's own, not a graph step's share. The
# clocks are left as they are (`--clock-control none`, as the device's METHOD.md asks), and the
# command is stopped once COUNT launches are profiled (`--kill yes`).
# PAGEDSERVE_KERNEL_CACHE, if set, holds the binary's compiled kernels.
set -u
ps=${PAGEDSERVE:-target/release/pagedserve}
out=${1:?OUTDIR}; label=${2:?LABEL}; regex=${3:?KERNEL_REGEX}; skip=${4:?SKIP}; count=${5:?COUNT}
shift 5
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "no pagedserve command given" >&2; exit 2; }
command -v ncu > /dev/null || { echo "ncu is not on the PATH" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
ncu --clock-control none --kill yes -k "regex:$regex" --launch-skip "$skip" --launch-count "$count" \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats \
  -f -o "$out/$label" "$ps" "$@" > "$out/$label.log" 2>&1
status=$?
tail -3 "$out/$label.log"
[ -f "$out/$label.ncu-rep" ] || { echo "no report (ncu exit $status)"; exit 1; }
ncu --import "$out/$label.ncu-rep" --page raw --csv --print-units base > "$out/$label.csv" 2> "$out/$label.import.log"
python3 "$here/ncu_summary.py" "$out/$label.csv"
