"""Preflight on the GPU machine, BEFORE installing vLLM (plain python3, no PYTHONPATH).

Fails fast (exit 1) on anything that would stop vLLM 0.24.0 from starting, and prints
one line per check, so a single call shows everything that is off:
  python3 scripts/peer/vllm/check_env.py [PIECES_DIR]
"""
import hashlib
import importlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
PIECES = sys.argv[1] if len(sys.argv) > 1 else "/tmp/peer-pieces"
fails, warns = [], []


def line(status, what, detail=""):
    print(f"[{status:4s}] {what}{': ' + detail if detail else ''}", flush=True)
    if status == "FAIL":
        fails.append(what)
    elif status == "WARN":
        warns.append(what)


# Packages vLLM imports at start-up that are NOT carried (they come from the machine).
# (import name, distribution, specifier vLLM or a carried package asks for, critical?)
GPU_SIDE = [
    # import name, distribution, specifier, import failure fatal?, version mismatch fatal?
    ("torch", "torch", "==2.11.0", True, True),
    ("torchvision", "torchvision", "==0.26.0", True, True),
    ("torchaudio", "torchaudio", "==2.11.0", True, True),
    ("triton", "triton", "==3.6.0", True, True),
    ("transformers", "transformers", ">=5.5.3", True, True),
    ("tokenizers", "tokenizers", ">=0.21.1", True, True),
    ("huggingface_hub", "huggingface-hub", "", True, False),
    ("safetensors", "safetensors", ">=0.6.2", True, True),
    ("numpy", "numpy", "", True, False),
    ("regex", "regex", "", True, False),
    ("requests", "requests", ">=2.26.0", True, False),
    ("tqdm", "tqdm", "", True, False),
    ("psutil", "psutil", "", True, False),
    ("cpuinfo", "py-cpuinfo", "", True, False),
    ("google.protobuf", "protobuf", ">=5.29.6", True, False),
    ("PIL", "pillow", "", True, False),
    ("aiohttp", "aiohttp", ">=3.13.3", True, False),
    ("prometheus_client", "prometheus-client", ">=0.18.0,<1.0.0", True, False),
    ("yaml", "pyyaml", "", True, False),
    ("six", "six", ">=1.16.0", False, False),
    ("setuptools", "setuptools", ">=77.0.3,<81.0.0", True, False),
    ("einops", "einops", "", True, False),
    ("cloudpickle", "cloudpickle", "", True, False),
    ("cv2", "opencv-python-headless", ">=4.13.0", True, False),
    ("sentencepiece", "sentencepiece", "", True, False),
    ("tiktoken", "tiktoken", ">=0.6.0", True, False),
    ("anyio", "anyio", ">=4.0.0,<5", True, True),      # starlette 1.10, openai 2.54, watchfiles
    ("httpx", "httpx", ">=0.23.0,<1", True, True),      # openai 2.54
    ("h11", "h11", ">=0.8", True, True),                # uvicorn
    ("click", "click", ">=7.0", True, True),            # uvicorn
    ("uvloop", "uvloop", "", True, False),
    ("jinja2", "jinja2", "", True, False),
    ("filelock", "filelock", ">=3.16.1", True, False),
    ("packaging", "packaging", "", True, False),
    ("annotated_doc", "annotated_doc", ">=0.0.2", True, True),  # fastapi 0.136
    ("xxhash", "xxhash", "", False, False),
    ("ninja", "ninja", "", False, False),
    ("numba", "numba", "==0.65.0", False, False),       # only the n-gram speculative decoder
]


def spec_ok(version, spec):
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
        return Version(version) in SpecifierSet(spec)
    except Exception:
        return True


def main():
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    if sys.version_info[:2] != (3, 12):
        line("FAIL", "python is 3.12 (the pieces are built for cp312)", sys.version.split()[0])
    else:
        line("OK", "python 3.12")
    try:
        import lzma  # noqa: F401
        line("OK", "lzma module (unpacks the .xz pieces)")
    except Exception as e:
        line("FAIL", "lzma module", repr(e))

    # pieces present and intact
    want = {}
    with open(os.path.join(HERE, "pieces.sha256")) as f:
        for ln in f:
            h, name = ln.split()
            want[name] = h
    have = sorted(os.listdir(PIECES)) if os.path.isdir(PIECES) else []
    for name in have:
        if name not in want:
            continue
        h = hashlib.sha256()
        with open(os.path.join(PIECES, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        line("OK" if h.hexdigest() == want[name] else "FAIL", f"piece {name} sha256")
    need = [n for n in want if n.startswith("vllm-site.tar.xz.part-")]
    missing = [n for n in need if n not in have]
    if missing:
        line("FAIL", "pieces of the install present in " + PIECES, "missing " + " ".join(missing))

    # toolchain that torch.compile / Triton need at start-up
    cc = shutil.which("gcc") or shutil.which("cc")
    line("OK" if cc else "FAIL", "C compiler (Triton builds its launcher; Inductor)", cc or "none")
    inc = sysconfig.get_paths().get("include", "")
    line("OK" if os.path.exists(os.path.join(inc, "Python.h")) else "FAIL",
         "Python.h (Triton launcher build)", inc)
    line("INFO", "nvcc", shutil.which("nvcc") or "not on PATH (not needed)")
    st = os.statvfs("/tmp")
    free = st.f_bavail * st.f_frsize / 2**30
    line("OK" if free > 3 else "FAIL", "free space in /tmp", f"{free:.1f} GiB")
    try:
        import resource
        line("INFO", "ulimit -n", str(resource.getrlimit(resource.RLIMIT_NOFILE)))
    except Exception:
        pass
    try:
        st = os.statvfs("/dev/shm")
        line("INFO", "/dev/shm", f"{st.f_blocks * st.f_frsize / 2**30:.1f} GiB")
    except Exception as e:
        line("INFO", "/dev/shm", repr(e))

    # GPU and torch
    try:
        import torch
        cuda = torch.version.cuda
        line("OK" if torch.__version__.startswith("2.11.0") else "FAIL", "torch 2.11.0", torch.__version__)
        line("OK" if (cuda or "").startswith("13.") else "FAIL", "torch built for CUDA 13 (vLLM wheel links libcudart.so.13)", str(cuda))
        if not torch.cuda.is_available():
            line("FAIL", "torch.cuda.is_available()")
        else:
            cap = torch.cuda.get_device_capability(0)
            name = torch.cuda.get_device_name(0)
            mem = torch.cuda.get_device_properties(0).total_memory / 2**30
            line("OK" if cap[0] == 9 else "FAIL", "GPU is sm_9x (FA3 and the pruned _C need it)",
                 f"{name}, sm_{cap[0]}{cap[1]}, {mem:.0f} GiB, {torch.cuda.device_count()} device(s)")
    except Exception as e:
        line("FAIL", "import torch", repr(e))
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.used,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        line("INFO", "nvidia-smi", out.stdout.strip() or out.stderr.strip())
    except Exception as e:
        line("INFO", "nvidia-smi", repr(e))

    # the machine's own packages vLLM imports at start-up
    for mod, dist, spec, critical, strict in GPU_SIDE:
        try:
            ver = md.version(dist)
        except md.PackageNotFoundError:
            ver = None
        try:
            importlib.import_module(mod)
            imp = None
        except Exception as e:
            imp = repr(e)[:160]
        if imp is not None:
            line("FAIL" if critical else "WARN", f"import {mod} ({dist} {ver})", imp)
        elif ver is not None and not spec_ok(ver, spec):
            line("FAIL" if strict else "WARN", f"{dist} {ver} outside {spec}",
                 "breaks start-up" if strict else "imports fine; vLLM's pin not met")
        else:
            line("OK", f"{dist} {ver}", spec)

    # carried packages that ALSO exist there: ours win through PYTHONPATH (informative)
    carried = []
    with open(os.path.join(HERE, "wheels.txt")) as f:
        for ln in f:
            ln = ln.split("#")[0].strip()
            if ln:
                carried.append(ln.split("==")[0])
    shadow = []
    for d in carried:
        try:
            shadow.append(f"{d} {md.version(d)}")
        except md.PackageNotFoundError:
            pass
    line("INFO", "carried packages that will shadow the machine's", ", ".join(shadow) or "none")
    try:
        md.version("vllm")
        line("WARN", "a vllm is already installed in the machine's site-packages; /tmp/site goes first")
    except md.PackageNotFoundError:
        pass

    print(f"preflight: {len(fails)} fail, {len(warns)} warn", flush=True)
    if fails:
        print("PREFLIGHT FAILED: " + "; ".join(fails), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
