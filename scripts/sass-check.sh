#!/usr/bin/env bash
# Assembles every kernel module for sm_90 with ptxas and reads the machine code back with
# cuobjdump (with nvdisasm, all from NVIDIA's PyPI wheels: no GPU, no CUDA toolkit), to catch before a GPU lease
# what NVRTC's PTX does not show:
#  * ptxas errors (the PTX compiles, the SASS does not);
#  * a memory instruction whose descriptor operand (`desc[URn]`, e.g. the L2 cache policy of a
#    `cp.async ... L2::cache_hint`: a 64-bit pair of uniform registers) starts at an odd uniform
#    register. ptxas 12.9, and the 580 driver's JIT alike, emitted such an operand for the skinny
#    kernel's hinted weight copies, and the GPU stopped with CUDA_ERROR_ILLEGAL_INSTRUCTION at
#    exactly that instruction (compute-sanitizer; BENCHMARKS.md, session 25); every kernel that
#    runs has them at even registers. Any is a failure.
# It also prints each kernel's registers and spills (a few kernels spill a few bytes by design:
# reported, not a failure).
# And it pins the machine code of the modules in kernels/sass-pins.txt (the bf16 and FP8 GEMV,
# which the one-row decode step rides on at about 95% of the copy rate): each kernel's
# instruction sequence, operands left out, must hash to its pinned value. A change there fails
# the check until the products table (`bench gpu --breakdown-8b-only`, ours against cuBLAS) has
# been measured on a GPU and the printed lines replace the module's in the pins file. Session 27
# added one parameter list and one branch to the GEMV's loop, off by default, and that alone made
# every bf16 product 15% slower on an H200, unseen for two sessions (BENCHMARKS.md, session 29).
#
# Usage: scripts/sass-check.sh [PAGEDSERVE_BINARY]   (default: target/release/pagedserve; it
#        compiles the kernels with NVRTC into a temporary cache), or scripts/sass-check.sh DIR for
#        the .ptx files already in a kernel cache DIR.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-$root/target/release/pagedserve}"
tools="$root/target/sass-tools"
wheels=("nvidia-cuda-nvcc-cu12==12.9.86" "nvidia-cuda-cuobjdump==13.5.37" "nvidia-cuda-nvdisasm==13.5.37")

source "$root/scripts/pip-target.sh"
pip_wheels "$tools" "${wheels[@]}"
# cuobjdump runs nvidia/cu13/bin/nvdisasm, found on the PATH.
bin_dir="$tools/nvidia/cu13/bin"
ptxas="$tools/nvidia/cuda_nvcc/bin/ptxas"
chmod +x "$ptxas" "$bin_dir/cuobjdump" "$bin_dir/nvdisasm"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cache="$work/cache"
mkdir -p "$cache"
if [[ -d "$bin" ]]; then
  cp "$bin"/*.ptx "$cache"/
else
  eval "$("$root/scripts/fetch-nvrtc.sh")"
  PAGEDSERVE_REQUIRE_NVRTC=1 PAGEDSERVE_KERNEL_CACHE="$cache" "$bin" check --compile-only sm_90 >&2
fi

python3 - "$ptxas" "$bin_dir" "$cache" "$root/kernels/sass-pins.txt" <<'PY'
import glob, hashlib, os, re, subprocess, sys
ptxas, bin_dir, cache, pins_file = sys.argv[1:]
odd = re.compile(r"desc\[UR(\d*[13579])\]")
# Pinned kernels: "module function instructions hash" lines ('#' comments).
pins = {}
for line in open(pins_file):
    if line.strip() and not line.startswith("#"):
        module, function, count, digest = line.split()
        pins.setdefault(module, {})[function] = (int(count), digest)
instruction = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
failures = []
for ptx in sorted(glob.glob(os.path.join(cache, "*.ptx"))):
    module = os.path.basename(ptx).rsplit("-", 1)[0]
    cubin = ptx[:-4] + ".cubin"
    assembled = subprocess.run([ptxas, "-arch=sm_90", "-v", ptx, "-o", cubin], capture_output=True, text=True)
    if assembled.returncode != 0:
        failures.append(f"{module}: ptxas failed:\n{assembled.stderr}")
        continue
    # ptxas -v: "Compiling entry function 'NAME'", then its stack/spill line, then its registers.
    kernel, kernels, spills = None, 0, []
    for line in assembled.stderr.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            kernel, kernels = m.group(1), kernels + 1
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if int(m.group(1)) or int(m.group(2)):
                spills.append(f"{kernel} ({m.group(1)}/{m.group(2)} bytes)")
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True, env=env).stdout
    function, bad, opcodes = None, [], {}
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            function = m.group(1)
            opcodes[function] = []
        else:
            if odd.search(line):
                bad.append(f"{function}: {line.split(';')[0].strip()}")
            if function and (m := instruction.search(line)):
                opcodes[function].append((m.group(1) or "").strip() + m.group(2))
    if module in pins:
        got = {f: (len(ops), hashlib.sha256("\n".join(ops).encode()).hexdigest()[:16]) for f, ops in opcodes.items()}
        if got != pins[module]:
            changed = sorted(f for f in set(got) | set(pins[module]) if got.get(f) != pins[module].get(f))
            failures.append(
                f"{module}: the pinned machine code changed ({len(changed)} kernels, e.g. {', '.join(changed[:3])}). Measure the "
                "products on a GPU (bench gpu --breakdown-8b-only: ours against cuBLAS, against BENCHMARKS.md's last figures), then "
                f"replace the module's lines in kernels/sass-pins.txt with:\n" + "\n".join(f"{module} {f} {n} {d}" for f, (n, d) in sorted(got.items())))
    if bad:
        failures.append(f"{module}: {len(bad)} descriptor operand(s) at an odd uniform register, e.g.\n  " + "\n  ".join(bad[:4]))
    print(f"{module:<20} {kernels:>4} kernels  spills: {', '.join(spills) if spills else 'none'}")
if failures:
    print("\n".join(["", "sass-check FAILED:"] + failures), file=sys.stderr)
    sys.exit(1)
print(f"sass-check: every module assembles for sm_90, no descriptor at an odd uniform register, pinned machine code unchanged ({', '.join(sorted(pins))})")
PY
