#!/bin/bash
# Stop the server that serve.sh started on PORT (its whole process group: API server
# and engine core).   bash scripts/peer/vllm/stop.sh PORT
PORT=${1:?PORT}
PIDF=/tmp/vllm-serve-$PORT.pid
[ -f "$PIDF" ] || { echo "no $PIDF"; exit 0; }
PID=$(cat "$PIDF")
kill -TERM -- -"$PID" 2>/dev/null
for _ in $(seq 1 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
kill -KILL -- -"$PID" 2>/dev/null
rm -f "$PIDF"
echo "stopped server on port $PORT (pid $PID)"
