#!/bin/bash
# On the GPU machine: one side-by-side sitting. vLLM 0.24.0 first, then pagedserve, on the same GPU,
# the same shape and the same workloads (bench_device.sh for each), then a line per workload with
# both figures and their ratio: what BENCHMARKS.md's "beside vLLM" tables hold. vLLM goes first
# because its install and start take minutes, pagedserve's start seconds.
#
#   PAGEDSERVE=/tmp/ps bash scripts/peer/sitting_device.sh OUTDIR SHAPE WORKLOAD...
#
# The call must send the vLLM piece (.peer/p1; vllm/ensure.sh installs it, or finds it installed on
# a warm machine). Files in OUTDIR: vllm_install.txt, vllm.jsonl (its start log lines in
# vllm_start.txt), pagedserve.jsonl. bench_device.sh's environment (PAGEDSERVE, PS_EXTRA,
# VLLM_EXTRA, ...) applies. Example:
#   bash scripts/peer/sitting_device.sh $OUT llama-3.1-8b one=fixed:128:256:8:1 c32=fixed:128:128:256:32 sg=sharegpt:1000:1000
set -u
out=${1:?OUTDIR}; shape=${2:?SHAPE}; shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
bash "$here/vllm/ensure.sh" > "$out/vllm_install.txt" 2>&1 || { tail -40 "$out/vllm_install.txt"; exit 1; }
SERVE_TIMEOUT=${SERVE_TIMEOUT:-300} bash "$here/bench_device.sh" vllm "$shape" "$@" > "$out/vllm.jsonl" 2> "$out/vllm_start.txt"
bash "$here/bench_device.sh" pagedserve "$shape" "$@" > "$out/pagedserve.jsonl" 2>&1
python3 "$here/sitting_table.py" "$out/pagedserve.jsonl" "$out/vllm.jsonl" "$@"
