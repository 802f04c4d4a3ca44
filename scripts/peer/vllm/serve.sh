#!/bin/bash
# Start vLLM's OpenAI-compatible server on the GPU machine with dummy (random) weights,
# in the background (its own session, so it outlives the run's command), and wait
# until /health answers. Run from the repository root after install.sh:
#   bash scripts/peer/vllm/serve.sh CONFIG_DIR PORT [extra vllm serve args...]
# e.g. bash scripts/peer/vllm/serve.sh scripts/peer/vllm/configs/llama-3.1-8b 8100 --max-model-len 8192
# Env: SERVE_TIMEOUT (s, default 900).  Log: /tmp/vllm-serve-PORT.log
# Stop: bash scripts/peer/vllm/stop.sh PORT
set -u
CFG=$(cd "${1:?CONFIG_DIR}" && pwd) || exit 1
PORT=${2:?PORT}
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
LOG=/tmp/vllm-serve-$PORT.log
PIDF=/tmp/vllm-serve-$PORT.pid
NAME=$(basename "$CFG")
if [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then
  echo "a server from $PIDF is still running on port $PORT: bash scripts/peer/vllm/stop.sh $PORT first"; exit 1
fi
# `vllm serve` is the console script for vllm.entrypoints.cli.main; /tmp/site has no bin/.
python3 - "$LOG" "$PIDF" python3 -m vllm.entrypoints.cli.main serve "$CFG" \
  --served-model-name "$NAME" --load-format dummy --skip-tokenizer-init \
  --host 127.0.0.1 --port "$PORT" "$@" <<'EOF'
import subprocess, sys
log, pidf, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
p = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, start_new_session=True)
open(pidf, "w").write(str(p.pid))
print("started:", " ".join(cmd), "pid", p.pid, flush=True)
EOF
PID=$(cat "$PIDF")
T0=$(date +%s)
while true; do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
    echo "READY: $NAME on http://127.0.0.1:$PORT after $(( $(date +%s) - T0 )) s (model name \"$NAME\", log $LOG)"
    grep -E "Using .*backend|FlashAttention version|flash_attn|torch.compile took|Graph capturing finished|Capturing CUDA graphs|GPU KV cache size|Maximum concurrency|Available KV cache memory|init engine .* took|max_num_seqs|WARNING" "$LOG" | grep -v "ulimit" | tail -n 25
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "SERVER DIED after $(( $(date +%s) - T0 )) s; last 120 lines of $LOG:"; tail -n 120 "$LOG"; exit 1
  fi
  if [ $(( $(date +%s) - T0 )) -gt "${SERVE_TIMEOUT:-900}" ]; then
    echo "SERVER NOT READY after ${SERVE_TIMEOUT:-900} s; last 120 lines of $LOG:"; tail -n 120 "$LOG"
    kill -- -"$PID" 2>/dev/null; exit 1
  fi
  sleep 3
done
