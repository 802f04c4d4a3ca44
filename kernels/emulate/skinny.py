# Emulates kernels/skinny.cu lane by lane on the CPU (numpy): which 16-byte vectors each lane
# copies into the swizzled ring slots and into the staged slices of x, the rows each lane hands
# ldmatrix, the fragments mma.sync m16n8k16 gets as the PTX ISA lays them out (fragments.py),
# where each lane writes its accumulators, and the split-K partials added in split order, against
# a plain float64 product. It checks the index arithmetic (the swizzle, partial row groups, input rows past m,
# slices and splits that end inside a chunk run); not the cp.async pipeline or the barriers,
# which only the GPU check (`pagedserve check`) covers. Run: python3 kernels/emulate/skinny.py
# (a few seconds). Keep it in step with the kernel when either changes.
import numpy as np
from fragments import bf, ldmatrix_x4, mma

SK_WARPS, SK_KC, SK_STAGES, SK_SLICE, SK_XPAD = 16, 64, 4, 2048, 8


def silu_slice(NT, gate_up, m, k, kk0, vecs_per_row):
    # SK_SILU's staging of one slice: thread t's vectors e = t + 512 i (i < SK_SILU_VECS), row
    # e // vecs_per_row, activation bf16(silu(gate) * up) of its 8 values; rows m..ROWS zero.
    ROWS, SLICE = 8 * NT, SK_SLICE // NT
    xs = np.full((ROWS, SLICE + SK_XPAD), np.nan, np.float32)
    threads = SK_WARPS * 32
    for t in range(threads):
        for i in range(SK_SLICE * 8 // 8 // threads):
            e = t + i * threads
            r = e // vecs_per_row if vecs_per_row > 0 else ROWS
            v = e - r * vecs_per_row
            if r < ROWS:
                if r < m:
                    g = gate_up[r, kk0 + 8 * v:kk0 + 8 * v + 8].astype(np.float32)
                    u = gate_up[r, k + kk0 + 8 * v:k + kk0 + 8 * v + 8].astype(np.float32)
                    xs[r, 8 * v:8 * v + 8] = bf(g / (1.0 + np.exp(-g)) * u)
                else:
                    xs[r, 8 * v:8 * v + 8] = 0.0
    return xs


def kernel(NT, x, w, m, n, k, k_per_split, silu=False):
    SLICE = SK_SLICE // NT
    CPS = SLICE // SK_KC
    ROWS = 8 * NT
    rows_per_block = 16 * SK_WARPS
    groups = -(-n // rows_per_block)
    splits = -(-k // k_per_split)
    out = np.full((m, n), np.nan)
    partials = np.full((splits, m, n), np.nan)
    for bx in range(groups):
        for by in range(splits):
            k_begin = by * k_per_split
            k_end = min(k, k_begin + k_per_split)
            chunks = (k_end - k_begin) // SK_KC
            for warp in range(SK_WARPS):
                row0 = bx * rows_per_block + warp * 16
                acc = np.zeros((NT, 32, 4))
                for q in range(chunks):
                    # The slice holding chunk q, as issue_slice staged it (rows past m zero).
                    first = (q // CPS) * CPS
                    kk0 = k_begin + first * SK_KC
                    length = min(CPS, chunks - first) * SK_KC
                    if silu:
                        xs = silu_slice(NT, x, m, k, kk0, length // 8)
                    else:
                        xs = np.zeros((ROWS, SLICE + SK_XPAD), np.float32)
                        xs[:, :] = np.nan  # padding and unused columns are never read
                        for r in range(ROWS):
                            xs[r, :length] = x[r, kk0:kk0 + length] if r < m else 0.0
                    # The ring stage: row r's vector t at slot r * 8 + (t ^ (r & 7)), copied by
                    # instruction v = r // 4, lane 8 * (r % 4) + t.
                    stage = np.full((128, 8), np.nan, np.float32)
                    for v in range(4):
                        for lane in range(32):
                            t, r = lane & 7, 4 * v + (lane >> 3)
                            src = k_begin + q * SK_KC + 8 * t
                            stage[r * 8 + (t ^ (r & 7))] = w[row0 + r, src:src + 8] if row0 + r < n else 0.0
                    a = []
                    for step in range(4):
                        addr = []
                        for lane in range(32):
                            r = (lane & 7) + 8 * ((lane >> 3) & 1)
                            addr.append((r * 8 + ((2 * step + (lane >> 4)) ^ (r & 7)), 0))
                        a.append(ldmatrix_x4(stage, addr))
                    col = (q % CPS) * SK_KC
                    for j in range(NT):
                        lo = ldmatrix_x4(xs, [(8 * j + (lane & 7), col + 8 * (lane >> 3)) for lane in range(32)])
                        hi = ldmatrix_x4(xs, [(8 * j + (lane & 7), col + 32 + 8 * (lane >> 3)) for lane in range(32)])
                        for step, (b0, b1) in enumerate([(lo[0], lo[1]), (lo[2], lo[3]), (hi[0], hi[1]), (hi[2], hi[3])]):
                            mma(acc[j], a[step], b0, b1)
                for j in range(NT):
                    for lane in range(32):
                        g, c = lane // 4, lane % 4
                        for e in range(4):
                            row, r = row0 + g + 8 * (e >> 1), 8 * j + 2 * c + (e & 1)
                            if row < n and r < m:
                                if splits == 1:
                                    out[r, row] = acc[j][lane][e]
                                else:
                                    partials[by, r, row] = acc[j][lane][e]
        if splits > 1:
            # The last block of the group adds the splits in split order: thread t's slots
            # e = t + 512 i (i < NT), each four neighbouring rows.
            first_row = bx * rows_per_block
            rows = min(rows_per_block, n - first_row)
            quads = (rows + 3) // 4
            for t in range(SK_WARPS * 32):
                for slot in range(NT):
                    e = t + slot * SK_WARPS * 32
                    if e >= m * quads:
                        continue
                    r, row = e // quads, first_row + 4 * (e % quads)
                    for i in range(4):
                        if row + i >= first_row + rows:
                            break
                        total = 0.0
                        for s in range(splits):
                            total += partials[s, r, row + i]
                        assert np.isnan(out[r, row + i]), "an output written twice"
                        out[r, row + i] = total
    return out


def check(NT, m, n, k, k_per_split, rng):
    x = bf(rng.standard_normal((m, k)))
    w = bf(rng.standard_normal((n, k)) * 0.05)
    got = kernel(NT, x, w, m, n, k, k_per_split)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    err = np.max(np.abs(got - want))
    assert np.isfinite(got).all(), "an output was never written"
    assert err < 1e-3, f"NT {NT} m {m} n {n} k {k} split {k_per_split}: max error {err}"
    print(f"NT {NT}: m {m:2} n {n:3} k {k:4} k/split {k_per_split:4}: max |error| {err:.1e}")


def check_silu(NT, m, n, k, k_per_split, rng):
    gate_up = bf(rng.standard_normal((m, 2 * k)))
    w = bf(rng.standard_normal((n, k)) * 0.05)
    got = kernel(NT, gate_up, w, m, n, k, k_per_split, silu=True)
    g, u = gate_up[:, :k].astype(np.float32), gate_up[:, k:].astype(np.float32)
    act = bf(g / (1.0 + np.exp(-g)) * u)
    want = act.astype(np.float64) @ w.astype(np.float64).T
    err = np.max(np.abs(got - want))
    assert np.isfinite(got).all(), "an output was never written"
    assert err < 1e-3, f"silu NT {NT} m {m} n {n} k {k} split {k_per_split}: max error {err}"
    print(f"silu NT {NT}: m {m:2} n {n:3} k {k:4} k/split {k_per_split:4}: max |error| {err:.1e}")


rng = np.random.default_rng(0)
# One split over two slices and a partial third (NT 4: 512-value slices), a partial row group.
check(4, 27, 276, 1152, 1152, rng)
# Splits that end inside a slice, and a split shorter than the ring.
check(4, 32, 260, 1216, 576, rng)
check(2, 9, 40, 2112, 1088, rng)
check(4, 31, 263, 640, 192, rng)  # rows not a multiple of 4: the reduction's scalar reads
check(8, 64, 20, 384, 128, rng)
check(1, 3, 17, 2176, 2176, rng)
# The SiLU staging: a slice cut short by its split, rows past m.
check_silu(4, 30, 40, 1152, 640, rng)
check_silu(8, 33, 20, 448, 448, rng)
print("skinny: ok")
