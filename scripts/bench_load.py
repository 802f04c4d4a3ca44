#!/usr/bin/env python3
"""Server start-up: runs a server command, and reports the seconds until `/health` answers 200
and the peak host memory of the process while it loads (anonymous and file-backed resident
memory, sampled from /proc every 50 ms: file-backed pages are the memory-mapped weights).
Standard library only.

    python3 scripts/bench_load.py --port 8123 --label NAME -- pagedserve serve --model DIR --port 8123 ...

The server's output is kept in /tmp/bench_load_NAME.log.
"""

import argparse
import json
import subprocess
import sys
import time
import urllib.request


def rss(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    fields[key] = int(value.split()[0]) // 1024
    except FileNotFoundError:
        pass
    return fields


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--label", default="")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.time()
    log_path = f"/tmp/bench_load_{args.label or args.port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    peak = {"RssAnon": 0, "RssFile": 0}
    ready = None
    while time.time() - started < args.timeout:
        for key, value in rss(proc.pid).items():
            if key in peak:
                peak[key] = max(peak[key], value)
        if proc.poll() is not None:
            break
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=1).status == 200:
                ready = time.time() - started
                break
        except Exception:
            pass
        time.sleep(0.05)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    result = {"label": args.label, "ready_s": None if ready is None else round(ready, 1),
              "peak_rss_anon_mib": peak["RssAnon"], "peak_rss_file_mib": peak["RssFile"]}
    print(json.dumps(result))
    if ready is None:
        print(open(log_path).read()[-3000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
