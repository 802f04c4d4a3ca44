"""One line per kernel launch from Nsight Compute's raw page (`ncu --import R --page raw --csv
--print-units base`): what bounds each kernel, in a form short enough to read in a device call's
output. Used by profile_device.sh; also runs on its own:

    python3 scripts/peer/ncu_summary.py REPORT.csv

Launches of one kernel with the same grid are one line, the median launch by duration, with
their count (n). Columns: kernel (name without its argument list), grid x block, registers a thread, dynamic
shared memory, duration (µs), DRAM bytes moved (MB, reads and writes) and their rate (GB/s), DRAM
throughput (% of peak), achieved occupancy (% of the warps a multiprocessor holds),
issue slots busy (%), then the four largest warp stall reasons (cycles a warp spends stalled on
each, per instruction issued). Metrics the report lacks print as '-'.
"""
import csv
import re
import sys


def number(text):
    """A raw-page value as a float (thousands separators dropped), or None."""
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def first(row, *names):
    """The first of `names` that the row has a number for."""
    for name in names:
        value = number(row.get(name))
        if value is not None:
            return value
    return None


def stall_reasons(row):
    """(reason, cycles per issued instruction), largest first: the `..._per_issue_active.ratio`
    metrics of the WarpStateStats section, or its per-warp latency variant in older versions."""
    found = []
    for name, text in row.items():
        match = re.fullmatch(r"smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)(?:_per_issue_active\.ratio)?", name or "")
        value = number(text)
        if match and value is not None and match.group(1) not in ("not_issued",):
            found.append((match.group(1), value))
    return sorted(found, key=lambda item: -item[1])


def dims(text):
    """'(128, 2, 1)' as '128x2' (trailing ones dropped)."""
    parts = re.findall(r"\d+", text or "")
    while len(parts) > 1 and parts[-1] == "1":
        parts.pop()
    return "x".join(parts) or "?"


def short(name):
    return (name or "?").split("(")[0].strip()


def show(value, fmt):
    return "-" if value is None else format(value, fmt)


def summarize(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    # The line after the header gives the units; with --print-units base they are base units.
    rows = [r for r in rows if r.get("ID", "").strip().isdigit()]
    if not rows:
        print(f"{path}: no kernel rows")
        return 1
    # Launches of one kernel with one grid are one line: the median launch (by duration).
    groups = {}
    for row in rows:
        key = (short(row.get("Kernel Name")), row.get("Grid Size"), row.get("Block Size"))
        groups.setdefault(key, []).append(row)
    picked = []
    for launches in groups.values():
        launches.sort(key=lambda r: first(r, "gpu__time_duration.sum") or 0.0)
        picked.append((launches[len(launches) // 2], len(launches)))
    print(f"{'kernel':<44} {'n':>3} {'grid x block':>12} {'regs':>4} {'smem':>7} {'µs':>8} {'MB dram':>8} {'GB/s':>6} "
          f"{'dram%':>5} {'occ%':>5} {'issue%':>6}  stalls (cycles per issue)")
    for row, count in picked:
        ns = first(row, "gpu__time_duration.sum")
        # DRAM traffic (reads and writes) as the SpeedOfLight section gives it: bytes a second.
        per_second = first(row, "dram__bytes.sum.per_second")
        rate = per_second / 1e9 if per_second is not None else None
        read = rate * ns if rate is not None and ns else None  # GB/s x ns = bytes
        grid, block = dims(row.get("Grid Size")), dims(row.get("Block Size"))
        stalls = ", ".join(f"{reason} {value:.1f}" for reason, value in stall_reasons(row)[:4])
        print(f"{short(row.get('Kernel Name'))[:44]:<44} {count:>3} {grid + ' x ' + block:>12} "
              f"{show(first(row, 'launch__registers_per_thread'), '.0f'):>4} "
              f"{show(first(row, 'launch__shared_mem_per_block_dynamic'), '.0f'):>7} "
              f"{show(ns and ns / 1e3, '.2f'):>8} {show(read and read / 1e6, '.2f'):>8} {show(rate, '.0f'):>6} "
              f"{show(first(row, 'gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed', 'dram__throughput.avg.pct_of_peak_sustained_elapsed'), '.1f'):>5} "
              f"{show(first(row, 'sm__warps_active.avg.pct_of_peak_sustained_active'), '.1f'):>5} "
              f"{show(first(row, 'smsp__issue_active.avg.pct_of_peak_sustained_active'), '.1f'):>6}  {stalls}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(summarize(sys.argv[1]))
