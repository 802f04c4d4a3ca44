#!/bin/bash
# The side-by-side benchmark, on the GPU machine: start SYSTEM (pagedserve or vllm) on SHAPE with
# dummy weights and the same serving limits, wait for /health, run each workload with the
# project's client (scripts/bench_http.py: one JSON line per workload), stop the server.
#
#   bash scripts/peer/bench_device.sh SYSTEM SHAPE WORKLOAD...
#
# SYSTEM    pagedserve | vllm
# SHAPE     a folder of scripts/peer/vllm/configs (smollm2-135m, llama-3.2-1b, llama-3.1-8b)
# WORKLOAD  NAME=sharegpt:N:CONCURRENCY or NAME=fixed:IN:OUT:N:CONCURRENCY, with ":nostream" at the
#           end for non-streamed requests. Example: sg=sharegpt:1000:1000 one=fixed:128:256:12:1
#
# Both servers get --max-model-len 2048 --max-num-seqs 512 --max-num-batched-tokens 8192.
# Environment: PAGEDSERVE (the binary; default target/release/pagedserve), MODELS (the model
# folders, made here by make_model_dirs.py when missing; default /tmp/peer-models), PS_DEVICE
# (pagedserve's --device; default cuda), PS_EXTRA and VLLM_EXTRA (more server arguments), PORT,
# PS_METRICS (a file: pagedserve's /metrics is saved there after the last workload, with its step
# phases, to see where the served time went). vLLM must be installed first
# (scripts/peer/vllm/ensure.sh with the .peer/p1 piece sent; see BENCHMARKS.md). Run from the
# repository root.
set -u
sys=${1:?SYSTEM}; shape=${2:?SHAPE}; shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)
models=${MODELS:-/tmp/peer-models}
port=${PORT:-$((18000 + RANDOM % 1000))}
[ -f "$models/$shape/tokenizer.json" ] || python3 "$root/scripts/peer/make_model_dirs.py" "$models" "$shape" >/dev/null || exit 1
model=$models/$shape
vocab=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$model/config.json")
limits="--max-model-len 2048 --max-num-seqs 512 --max-num-batched-tokens 8192"
export NCCL_NVLS_ENABLE=0
t0=$(date +%s.%N)
client_flags=""
case "$sys" in
  pagedserve)
    log=/tmp/pagedserve-$port.log
    # shellcheck disable=SC2086
    "${PAGEDSERVE:-$root/target/release/pagedserve}" serve --device "${PS_DEVICE:-cuda}" --model "$model" --load-format dummy \
      --port "$port" $limits --max-queue 4096 ${PS_EXTRA:-} >"$log" 2>&1 &
    pid=$!
    stop() { kill $pid 2>/dev/null; wait $pid 2>/dev/null; }
    trap stop EXIT
    up=""
    for _ in $(seq 1 600); do
      python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$port/health" 2>/dev/null && { up=1; break; }
      kill -0 $pid 2>/dev/null || break
      sleep 0.5
    done
    [ -n "$up" ] || { echo "{\"system\":\"$sys\",\"shape\":\"$shape\",\"error\":\"server not up\"}"; tail -25 "$log"; exit 1; }
    ;;
  vllm)
    log=/tmp/vllm-serve-$port.log
    # shellcheck disable=SC2086
    SERVE_TIMEOUT=${SERVE_TIMEOUT:-480} bash "$root/scripts/peer/vllm/serve.sh" "$model" "$port" $limits ${VLLM_EXTRA:-} >/tmp/vllm-start-$port.txt 2>&1 \
      || { echo "{\"system\":\"$sys\",\"shape\":\"$shape\",\"error\":\"server did not start\"}"; tail -40 /tmp/vllm-start-$port.txt; exit 1; }
    grep -E "READY|backend|torch.compile took|Graph capturing finished|KV cache size" /tmp/vllm-start-$port.txt | head -8 >&2
    client_flags="--token-ids"
    stop() { bash "$root/scripts/peer/vllm/stop.sh" "$port" >/dev/null 2>&1; }
    trap stop EXIT
    ;;
  *) echo "SYSTEM is pagedserve or vllm"; exit 2 ;;
esac
echo "{\"system\":\"$sys\",\"shape\":\"$shape\",\"startup_s\":$(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0")}"
for w in "$@"; do
  name=${w%%=*}; spec=${w#*=}; stream_flag=""
  case "$spec" in *:nostream) stream_flag="--no-stream"; spec=${spec%:nostream} ;; esac
  IFS=: read -r kind a b c d <<<"$spec"
  if [ "$kind" = sharegpt ]; then workload=sharegpt; n=$a; conc=$b
  else workload="fixed:$a:$b"; n=$c; conc=$d; fi
  # shellcheck disable=SC2086
  timeout 420 python3 "$root/scripts/bench_http.py" "http://127.0.0.1:$port" --workload "$workload" --n "$n" \
    --concurrency "$conc" --vocab "$vocab" --label "$sys/$shape/$name" $stream_flag $client_flags \
    || echo "{\"label\":\"$sys/$shape/$name\",\"error\":\"client failed\"}"
done
if [ "$sys" = pagedserve ] && [ -n "${PS_METRICS:-}" ]; then
  python3 -c "import urllib.request,sys; open(sys.argv[2],'wb').write(urllib.request.urlopen(sys.argv[1], timeout=10).read())" \
    "http://127.0.0.1:$port/metrics" "$PS_METRICS" || echo "{\"label\":\"$sys/$shape\",\"error\":\"metrics not saved\"}"
fi
stop
trap - EXIT
grep -iE "panic|error" "$log" | tail -3
true
