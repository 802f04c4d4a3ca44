"""The side-by-side table of one sitting: for each workload, pagedserve's and vLLM's output tok/s
and TPOT p50 from bench_device.sh's JSON lines, and their ratio (pagedserve over vLLM).

    python3 scripts/peer/sitting_table.py PAGEDSERVE.jsonl VLLM.jsonl [NAME=SPEC ...]

With workloads given (as to bench_device.sh), their rows come in that order; else in the order met.
A workload that failed or is missing on either side shows what is there and no ratio.
"""
import json
import sys


def results(path):
    """The workload results of one server's run, by workload name (the label's last part)."""
    found = {}
    with open(path) as lines:
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "label" in row:
                found[row["label"].rsplit("/", 1)[-1]] = row
    return found


def cell(row):
    if row is None:
        return "missing"
    if "output_tok_per_s" not in row:
        return row.get("error", "failed")
    return f"{row['output_tok_per_s']:,.1f} ({row.get('tpot_ms_p50', float('nan')):.2f} ms)"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    ours, peer = results(sys.argv[1]), results(sys.argv[2])
    names = [w.split("=", 1)[0] for w in sys.argv[3:]] or list(dict.fromkeys([*ours, *peer]))
    print(f"{'workload':<10} {'pagedserve tok/s (TPOT p50)':>30} {'vLLM tok/s (TPOT p50)':>30} {'ratio':>7}")
    for name in names:
        a, b = ours.get(name), peer.get(name)
        ratio = ""
        if a and b and a.get("output_tok_per_s") and b.get("output_tok_per_s"):
            ratio = f"{a['output_tok_per_s'] / b['output_tok_per_s']:.3f}x"
        print(f"{name:<10} {cell(a):>30} {cell(b):>30} {ratio:>7}")


if __name__ == "__main__":
    main()
