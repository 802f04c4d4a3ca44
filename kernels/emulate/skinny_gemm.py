# Emulates kernels/skinny_gemm.cu lane by lane on the CPU (numpy): the stream-K ranges, the
# cp.async copies into swizzled shared tiles (byte addresses, as the kernel computes them), the
# ldmatrix and mma.sync m16n8k16 fragment layouts as the PTX ISA defines them, the partials and
# the last block's fix-up (blocks run in a random order), and compares the result with x · Wᵀ in
# float64. It also checks that the 8 rows each ldmatrix matrix reads fall in 8 different bank
# groups. It does not model the ring's timing or the barriers, which only the GPU check
# (`pagedserve check`) covers. Run: python3 kernels/emulate/skinny_gemm.py (a few seconds). Keep it
# in step with the kernel when either changes.
import numpy as np

from fragments import bf, mma

rng = np.random.default_rng(0)
SK_THREADS, SK_BN, SK_BK = 256, 128, 64


def sk_offset(r, c):
    return r * 128 + ((c ^ (r & 7)) << 4)


def sk_block_of(it, total, blocks):
    return ((it + 1) * blocks - 1) // total


def ldmatrix_x4(smem, addr):
    # smem: flat bf16 elements; addr[lane]: byte address of the 8-element row this lane supplies.
    # Returns r[4][lane] = (lo, hi): lane (g, t) gets row g, columns 2t, 2t+1 of each matrix.
    r = np.zeros((4, 32, 2), np.float32)
    for i in range(4):
        rows = [addr[8 * i + j] for j in range(8)]
        assert all(a % 16 == 0 for a in rows)
        assert len({(a // 16) % 8 for a in rows}) == 8, "bank conflict"
        M = np.stack([smem[a // 2:a // 2 + 8] for a in rows])
        for lane in range(32):
            g, t = lane // 4, lane % 4
            r[i, lane] = M[g, 2 * t:2 * t + 2]
    return r


def skinny(x, w, m, n, k, NT, blocks, order):
    steps = k // SK_BK
    tiles = (n + SK_BN - 1) // SK_BN
    total = tiles * steps
    assert blocks <= total and k % SK_BK == 0 and m <= 8 * NT
    TILE = SK_BN * NT * 8
    out = np.full((m, n), np.nan)
    partials = np.full((blocks * 2 * TILE,), np.nan)
    counters = np.zeros(tiles, np.int64)
    W_BYTES = SK_BN * SK_BK * 2
    for b in order:
        lo, hi = b * total // blocks, (b + 1) * total // blocks
        acc = np.zeros((8, NT, 32, 4))  # [warp][j][lane][e]
        for it in range(lo, hi):
            t, s = it // steps, it % steps
            smem = np.full((W_BYTES + NT * 8 * SK_BK * 2) // 2, np.nan, np.float32)
            for tid in range(SK_THREADS):  # copy_w
                for i in range(SK_BN * 8 // SK_THREADS):
                    idx = tid + i * SK_THREADS
                    r, c = idx >> 3, idx & 7
                    row = t * SK_BN + r
                    a = sk_offset(r, c) // 2
                    smem[a:a + 8] = w[row, s * SK_BK + c * 8:s * SK_BK + c * 8 + 8] if row < n else 0
            for tid in range(SK_THREADS):  # copy_x
                for idx in range(tid, NT * 64, SK_THREADS):
                    r, c = idx >> 3, idx & 7
                    a = (W_BYTES + sk_offset(r, c)) // 2
                    smem[a:a + 8] = x[r, s * SK_BK + c * 8:s * SK_BK + c * 8 + 8] if r < m else 0
            for warp in range(8):
                for ks in range(SK_BK // 16):
                    addr = [sk_offset(warp * 16 + ((l >> 3) & 1) * 8 + (l & 7), ks * 2 + ((l >> 3) >> 1)) for l in range(32)]
                    a = ldmatrix_x4(smem, addr)
                    for j in range(0, NT, 2):
                        addr = [W_BYTES + sk_offset((j + ((l >> 3) >> 1)) * 8 + (l & 7), ks * 2 + ((l >> 3) & 1)) for l in range(32)]
                        bq = ldmatrix_x4(smem, addr)
                        mma(acc[warp, j], a, bq[0], bq[1])
                        mma(acc[warp, j + 1], a, bq[2], bq[3])
            if (it + 1) % steps != 0 and it + 1 != hi:
                continue
            whole = lo <= t * steps and it + 1 == (t + 1) * steps
            if whole:
                dst = None
            else:
                slot = 0 if t == lo // steps else 1
                dst = (b * 2 + slot) * TILE
            for warp in range(8):
                for j in range(NT):
                    for lane in range(32):
                        g, tg = lane >> 2, lane & 3
                        for e in range(4):
                            r, token = warp * 16 + g + (e >> 1) * 8, j * 8 + tg * 2 + (e & 1)
                            if dst is None:
                                if t * SK_BN + r < n and token < m:
                                    out[token, t * SK_BN + r] = acc[warp, j, lane, e]
                            else:
                                partials[dst + token * SK_BN + r] = acc[warp, j, lane, e]
            if dst is not None:
                first, last = sk_block_of(t * steps, total, blocks), sk_block_of((t + 1) * steps - 1, total, blocks)
                # Every contributor's range touches tile t, and none is empty.
                for bb in range(first, last + 1):
                    blo, bhi = bb * total // blocks, (bb + 1) * total // blocks
                    assert blo < bhi and blo < (t + 1) * steps and bhi > t * steps
                prev = counters[t]
                counters[t] += 1
                if prev == last - first:
                    for e in range(TILE):
                        acc_sum = 0.0
                        for bb in range(first, last + 1):
                            bb_slot = 0 if t == (bb * total // blocks) // steps else 1
                            v = partials[(bb * 2 + bb_slot) * TILE + e]
                            assert not np.isnan(v), "a partial read before it was written"
                            acc_sum += v
                        r, token = e % SK_BN, e // SK_BN
                        if t * SK_BN + r < n and token < m:
                            out[token, t * SK_BN + r] = acc_sum
                    counters[t] = 0
            acc[...] = 0
    assert (counters == 0).all(), "a counter left for the next launch"
    return out


cases = [  # m, n, k, NT, blocks
    (9, 300, 192, 2, 5),     # a partial last tile, tiles shared by 2-3 blocks
    (20, 256, 128, 4, 4),    # exact tiles, every block inside one tile
    (33, 200, 320, 8, 3),    # blocks spanning a tile end
    (64, 130, 64, 8, 2),     # one step a tile: whole tiles only
    (16, 384, 256, 2, 12),   # every block a third of a tile
]
for m, n, k, NT, blocks in cases:
    x = bf(rng.standard_normal((m, k)))
    w = bf(rng.standard_normal((n, k)))
    want = x.astype(np.float64) @ w.astype(np.float64).T
    for trial in range(2):
        order = rng.permutation(blocks)
        got = skinny(x, w, m, n, k, NT, blocks, order)
        assert not np.isnan(got).any(), f"unwritten outputs m {m} n {n} k {k}"
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-6, (m, n, k, err)
    print(f"m {m:2} n {n:3} k {k:3} rows {8 * NT:2} blocks {blocks:2}: max relative error {err:.1e}")
print("skinny_gemm emulation: every case matches")
