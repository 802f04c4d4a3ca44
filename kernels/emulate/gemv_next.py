# Emulates the seam prefetch of kernels/gemv.cu on the CPU: which bytes of the next product's
# weight each warp of a GEMV asks L2 for (`gemv_prefetch_next` in common.cuh, with the arguments
# `gemv::next_arguments` passes), against the bytes the next GEMV's warps copy in their first
# items (`gemv_body`'s `issue`: item -> row group and chunk, each lane's 16-byte vectors). It
# checks that every next warp's first `chunks` items are covered, that nothing else is asked for
# (no byte another warp's first items do not copy, none past the weight), and that every request
# is a whole number of 16-byte units at a 16-byte aligned address, at most 64 KB. Shapes: the
# Llama-3.1-8B and SmolLM2-135M products in bf16 and FP8, grids of the same, fewer and more warps
# than the next one. Mutations of the index arithmetic must fail. Run: python3
# kernels/emulate/gemv_next.py (about ten seconds). Keep it in step with the kernel when either changes.

import bisect

GEMV_STAGES = 6
STAGE_VECTORS = 4  # 16-byte vectors a lane per ring stage (GEMV_STAGE_VECTORS)


def issued_ranges(n, k, fp8, warps_total, warp, items):
    """Byte ranges [a, b) of the weight the GEMV's warp `warp` copies in its first `items` items."""
    rpw = 2 if fp8 else 1
    ur = STAGE_VECTORS // rpw
    row_bytes = k if fp8 else 2 * k
    vecs = k // 16 if fp8 else k // 8
    first_row = warp * rpw
    stride = warps_total * rpw
    groups = (n - first_row + stride - 1) // stride if first_row < n else 0
    chunk_vecs = 32 * ur
    chunks = (vecs + chunk_vecs - 1) // chunk_vecs
    out = []
    for item in range(min(items, groups * chunks)):
        g, c = divmod(item, chunks)
        row0 = first_row + g * stride
        for q in range(rpw):
            row = row0 + q
            if row >= n:
                continue
            lo = c * chunk_vecs
            hi = min((c + 1) * chunk_vecs, vecs)
            # Lanes' vectors v = c * chunk_vecs + j * 32 + lane (j < ur), valid when v < vecs: a
            # contiguous run.
            out.append((row * row_bytes + lo * 16, row * row_bytes + hi * 16))
    return out


def prefetch_ranges(warp, warps_here, row_bytes, n, rpw, warps, chunks, chunk_bytes, mutate=None):
    """`gemv_prefetch_next` of one warp (all lanes), as byte ranges of the next weight; `mutate`
    names a deliberate error that the checks must catch."""
    if chunks <= 0:
        return []
    chunks_per_row = (row_bytes + chunk_bytes - 1) // chunk_bytes
    groups = (chunks + chunks_per_row - 1) // chunks_per_row
    stride = (warps_here if mutate == "stride_here" else warps) * rpw
    out = []
    h = warp
    while h < warps:
        for lane in range(32):
            for j in range(lane, groups * rpw, 32):
                g, q = divmod(j, rpw)
                row = h * rpw + g * stride + q
                if row >= n:
                    continue
                take = min(chunks - g * chunks_per_row, chunks_per_row)
                if mutate == "take_all":
                    take = chunks
                nbytes = min(row_bytes, take * chunk_bytes)
                out.append((row * row_bytes, row * row_bytes + nbytes))
        h += warps_here
    return out


def next_arguments(n, k, fp8, next_warps, chunks):
    """What `gemv::next_arguments` passes for a next product of `n` rows of `k` (bf16 or FP8)."""
    rpw = 2 if fp8 else 1
    row_bytes = k if fp8 else 2 * k
    return dict(row_bytes=row_bytes, n=n, rpw=rpw, warps=next_warps, chunks=chunks, chunk_bytes=STAGE_VECTORS * 32 * 16 // rpw)


def union(ranges):
    merged = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def covers(outer, inner):
    """Whether the union `outer` (merged, sorted) contains every range of `inner`."""
    starts = [a for a, _ in outer]
    for a, b in inner:
        i = bisect.bisect_right(starts, a) - 1
        if i < 0 or outer[i][1] < b:
            return False
    return True


def check(n, k, fp8, warps_here, next_warps, chunks, mutate=None):
    args = next_arguments(n, k, fp8, next_warps, chunks)
    asked = []
    for warp in range(warps_here):
        for a, b in prefetch_ranges(warp, warps_here, args["row_bytes"], args["n"], args["rpw"], args["warps"], args["chunks"], args["chunk_bytes"], mutate):
            if a % 16 or (b - a) % 16 or b - a > 64 * 1024 or b - a <= 0:
                return f"request [{a}, {b}) not whole aligned 16-byte units of at most 64 KB"
            if b > n * args["row_bytes"]:
                return f"request [{a}, {b}) past the weight ({n * args['row_bytes']} bytes)"
            asked.append((a, b))
    wanted = [r for h in range(next_warps) for r in issued_ranges(n, k, fp8, next_warps, h, chunks)]
    if not covers(union(asked), wanted):
        return "a next warp's first items are not all asked for"
    if not covers(union(wanted), asked):
        return "asked for bytes no next warp copies first"
    return None


SHAPES = [
    (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),  # Llama-3.1-8B
    (960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576),  # SmolLM2-135M
    (100, 4096), (7, 8192),  # fewer rows than warps
]
GRIDS = [(132 * 16, 132 * 16), (132 * 16, 66 * 16), (66 * 16, 132 * 16), (132 * 12, 132 * 16), (40, 132 * 16)]

failures = 0
cases = 0
for fp8 in (False, True):
    for n, k in SHAPES:
        if fp8 and k % 16:
            continue
        for here, nxt in GRIDS:
            for chunks in (GEMV_STAGES - 1, 1, 10, 32):
                cases += 1
                err = check(n, k, fp8, here, nxt, chunks)
                if err:
                    failures += 1
                    print(f"FAIL n {n} k {k} fp8 {fp8} warps {here} -> {nxt} chunks {chunks}: {err}")
assert failures == 0, f"{failures} of {cases} cases failed"

# Mutations of the index arithmetic must be caught.
for mutate in ("stride_here", "take_all"):
    caught = any(check(n, k, fp8, here, nxt, 5, mutate) for fp8 in (False, True) for n, k in SHAPES for here, nxt in GRIDS)
    assert caught, f"mutation {mutate} not caught"
print(f"gemv_next: {cases} cases ok; mutations caught")
