#!/usr/bin/env python3
"""The Llama-3.1-8B products at a few rows through PyTorch's cuBLAS, on the GPU machine.

A second opinion on `pagedserve bench gpu`'s products table: each product alone, replayed in a
CUDA graph with the weights cycled past L2 (as `bench gpu` times them), through `torch.mm`, and
with K split explicitly into 2, 4 or 8 slices by a strided-batched product into float32
partials (what a consumer that sums the partials itself would pay for the product). Then the
kernels `torch.mm` launches at 32 rows (a split-K product shows its reduce kernel there).

    python3 scripts/peer/torch_products.py [ROWS,...]      # default 8,16,32,64

Uses the torch the device image carries; needs nothing from this repository.
"""
import statistics
import sys

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "head": (128256, 4096)}
COPIES = 4  # of every weight: 4 x 50 MB for the smallest, past the H100's and H200's L2
REPS = 20   # products a graph replay


def graph_us(fn):
    """Median µs of one `fn(copy)` call over 7 replays of a graph of REPS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPS):
            fn(i % COPIES)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPS)
    return statistics.median(times)


def main():
    rows = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8,16,32,64").split(",")]
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    weights = {name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)] for name, (n, k) in SHAPES.items()}
    last = (REPS - 1) % COPIES  # the copy the graph's last product used: its output is what is left
    for m in rows:
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            exact = x.float() @ weights[name][last].float().t()
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            us = graph_us(lambda c: torch.mm(x, weights[name][c].t(), out=out))
            err = (out.float() - exact).abs().max().item()
            line = [f"m={m:<3d} {name:8s} mm {us:8.2f} us {n * k * 2 / us / 1e3:6.0f} GB/s (err {err:.1e})"]
            for splits in (2, 4, 8):
                if k % (splits * 64):
                    continue
                xs = x.view(m, splits, k // splits).transpose(0, 1)
                partials = torch.empty(splits, m, n, device=dev, dtype=torch.float32)

                def split(c, splits=splits, xs=xs, partials=partials):
                    ws = weights[name][c].view(n, splits, k // splits).transpose(0, 1)
                    torch.bmm(xs, ws.transpose(1, 2), out_dtype=torch.float32, out=partials)

                us = graph_us(split)
                err = (partials.sum(0) - exact).abs().max().item()
                line.append(f"split{splits} {us:8.2f} us (err {err:.1e})")
            print("  ".join(line), flush=True)

    from torch.profiler import ProfilerActivity, profile
    for name in ("qkv", "o", "gate_up", "down", "head"):
        n, k = SHAPES[name]
        x = torch.randn(32, k, device=dev, dtype=torch.bfloat16)
        torch.mm(x, weights[name][0].t())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
            for c in range(COPIES):
                torch.mm(x, weights[name][c].t())
            torch.cuda.synchronize()
        kernels = {}
        for event in prof.events():
            if event.device_type.name == "CUDA":
                kernels.setdefault(event.name[:110], []).append(event.device_time)
        for kernel, times in kernels.items():
            print(f"  32 rows {name}: {len(times)} x {statistics.median(times):.2f} us  {kernel}")


if __name__ == "__main__":
    main()
