# Emulates the decode attention kernel over an FP8 cache (`paged_attention_fp8_hd*`,
# kernels/paged_attention.cu with FP8 = true) lane by lane on the CPU (numpy): each lane's
# shared-memory byte reads of the raw E4M3 key and value rows, the E4M3 -> f16 conversions and
# byte permutes, the permuted head dimensions of the query and key fragments, the value
# fragments' dimension permutation undone at the output, the online softmax and the warps' merge,
# with mma.sync m16n8k16 as the PTX ISA lays its fragments out. It compares that with float64
# attention over the same E4M3 values, and checks that the lanes' shared loads meet no bank
# conflict (head dims 64 and 128; 256: at most two-way). It does not model cp.async, the block
# table or split-K, which the GPU check (`pagedserve check`, the "fp8" rows) covers.
# Run: python3 kernels/emulate/paged_attention_fp8.py (about 10 s). Keep it in step with the
# kernel when either changes.
import sys

import numpy as np
from fragments import bf, mma

rng = np.random.default_rng(0)
DC_N, WARPS = 64, 4


def e4m3_value(b):
    b = int(b)
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 15, b & 7
    if e == 15 and m == 7:
        return np.nan
    if e == 0:
        return sign * m / 8 * 2.0**-6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


E4M3 = np.array([e4m3_value(b) for b in range(256)])
FINITE = [b for b in range(256) if np.isfinite(E4M3[b])]


def to_e4m3(x):
    # nearest finite E4M3 byte (ties are irrelevant here: the reference reads the same bytes)
    vals = E4M3[FINITE]
    return np.array([FINITE[int(np.argmin(np.abs(vals - v)))] for v in np.ravel(x)], np.uint8).reshape(np.shape(x))


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def byte_perm(x, y, s):
    bytes_ = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(bytes_[(s >> (4 * n)) & 7] << (8 * n) for n in range(4))


def half2x2(word):
    # e4m3x4_to_half2x2: bytes 0, 1 -> lo (byte 0 in the low half), 2, 3 -> hi
    b = [(word >> (8 * i)) & 0xFF for i in range(4)]
    return (E4M3[b[0]], E4M3[b[1]]), (E4M3[b[2]], E4M3[b[3]])


def word_at(row_bytes, at):
    return int(row_bytes[at]) | int(row_bytes[at + 1]) << 8 | int(row_bytes[at + 2]) << 16 | int(row_bytes[at + 3]) << 24


def strides(hd):
    return hd + (0 if hd == 64 else 16), hd + 16  # DecodeRows<HD, true>::K, ::V


def conflicts(addresses, width):
    # shared-memory wavefronts of one warp-wide load of `width` bytes a lane, beyond the first
    per_phase = {16: 8, 8: 16, 4: 32}[width]
    worst = 1
    for phase in range(0, 32, per_phase):
        banks = {}
        for lane in range(phase, phase + per_phase):
            for w in range(width // 4):
                word = addresses[lane] // 4 + w
                banks.setdefault(word % 32, set()).add(word)
        worst = max(worst, max(len(s) for s in banks.values()))
    return worst


def check_banks(hd):
    k_stride, v_stride = strides(hd)
    worst = 1
    for c in range(hd // 64):  # the key loads: rows gid and gid + 8, 16 bytes at tig * HD/4 + 16c
        for r0 in (0, 8):
            worst = max(worst, conflicts([(lane // 4 + r0) * k_stride + (lane % 4) * (hd // 4) + 16 * c for lane in range(32)], 16))
    width = min(hd // 8, 16)  # the value loads (`load_words`): rows tig*2 (+1, +8, +9), HD/8 bytes at gid * HD/8
    for part in range(hd // 8 // width):
        for r0 in (0, 1, 8, 9):
            worst = max(worst, conflicts([((lane % 4) * 2 + r0) * v_stride + (lane // 4) * (hd // 8) + part * width for lane in range(32)], width))
    return worst


def kernel(hd, q, k_bytes, v_bytes, scale):
    """One block (no split) of `q` [group, hd] (bf16 values) over keys/values [context, hd] (E4M3 bytes)."""
    group, context = q.shape[0], k_bytes.shape[0]
    k_stride, v_stride = strides(hd)
    scale_log2 = scale * 1.4426950408889634
    upper_rows = group > 8
    # qf[kk][e][lane] = the pair at row gid + (e & 1) * 8, dims tig * HD/4 + kk * 4 + (e >> 1) * 2
    qf = np.zeros((hd // 16, 4, 32, 2))
    for kk in range(hd // 16):
        for e in range(4):
            for lane in range(32):
                gid, tig = lane // 4, lane % 4
                r, col = gid + (e & 1) * 8, tig * (hd // 4) + kk * 4 + (e >> 1) * 2
                if r < group:
                    qf[kk, e, lane] = f16(q[r, col:col + 2])
    warps = [dict(o=np.zeros((hd // 8, 32, 4)), mx=np.full((2, 32), -np.inf), sm=np.zeros((2, 32))) for _ in range(WARPS)]
    num_tiles = (context + DC_N - 1) // DC_N
    for i in range(num_tiles):
        # The raw tile as cp.async leaves it: rows past the context zero-filled, the padding of
        # each row garbage (never read: NaN bytes there would poison the result).
        ks = rng.integers(0, 256, (DC_N, k_stride), dtype=np.uint8)
        vs = rng.integers(0, 256, (DC_N, v_stride), dtype=np.uint8)
        for r in range(DC_N):
            p = i * DC_N + r
            ks[r, :hd] = k_bytes[p] if p < context else 0
            vs[r, :hd] = v_bytes[p] if p < context else 0
        for warp, st in enumerate(warps):
            key0 = i * DC_N + warp * 16
            if key0 >= context:
                continue
            kw, vw = ks[warp * 16:warp * 16 + 16], vs[warp * 16:warp * 16 + 16]
            s = np.zeros((2, 32, 4))
            s_odd = np.zeros((2, 32, 4))
            for c in range(hd // 64):
                for j in range(4):
                    kk = c * 4 + j
                    b = [np.zeros((32, 2)) for _ in range(4)]
                    for lane in range(32):
                        gid, tig = lane // 4, lane % 4
                        at = tig * (hd // 4) + c * 16 + 4 * j
                        b[0][lane], b[1][lane] = half2x2(word_at(kw[gid], at))
                        b[2][lane], b[3][lane] = half2x2(word_at(kw[gid + 8], at))
                    acc = s if kk % 2 == 0 else s_odd
                    mma(acc[0], qf[kk], b[0], b[1])
                    mma(acc[1], qf[kk], b[2], b[3])
            s = s + s_odd
            for n in range(2):
                for lane in range(32):
                    for e in range(4):
                        if key0 + n * 8 + (lane % 4) * 2 + (e & 1) >= context:
                            s[n, lane, e] = -np.inf
            for r in range(2):
                if r == 1 and not upper_rows:
                    continue
                for quad in range(8):
                    lanes = range(quad * 4, quad * 4 + 4)
                    mx = max(max(s[0, l, 2 * r], s[0, l, 2 * r + 1], s[1, l, 2 * r], s[1, l, 2 * r + 1]) for l in lanes)
                    for l in lanes:
                        new_max = max(st["mx"][r, l], mx * scale_log2)
                        corr = 2.0 ** (st["mx"][r, l] - new_max)
                        st["mx"][r, l] = new_max
                        total = 0.0
                        for n in range(2):
                            for e in range(2):
                                pv = 2.0 ** (s[n, l, 2 * r + e] * scale_log2 - new_max)
                                s[n, l, 2 * r + e] = pv
                                total += pv
                        st["sm"][r, l] = st["sm"][r, l] * corr + total
                        st["o"][:, l, 2 * r] *= corr
                        st["o"][:, l, 2 * r + 1] *= corr
            if not upper_rows:
                s[:, :, 2:] = 0
            a = np.zeros((4, 32, 2))
            for lane in range(32):
                a[0, lane] = f16(s[0, lane, 0:2])
                a[1, lane] = f16(s[0, lane, 2:4])
                a[2, lane] = f16(s[1, lane, 0:2])
                a[3, lane] = f16(s[1, lane, 2:4])
            words = hd // 32
            for w in range(words):
                b0 = [np.zeros((32, 2)) for _ in range(4)]
                b1 = [np.zeros((32, 2)) for _ in range(4)]
                for lane in range(32):
                    gid, tig = lane // 4, lane % 4
                    at = gid * (hd // 8) + 4 * w
                    va, vb = word_at(vw[tig * 2], at), word_at(vw[tig * 2 + 1], at)
                    vc, vd = word_at(vw[tig * 2 + 8], at), word_at(vw[tig * 2 + 9], at)
                    b0[0][lane], b0[1][lane] = half2x2(byte_perm(va, vb, 0x5140))
                    b0[2][lane], b0[3][lane] = half2x2(byte_perm(va, vb, 0x7362))
                    b1[0][lane], b1[1][lane] = half2x2(byte_perm(vc, vd, 0x5140))
                    b1[2][lane], b1[3][lane] = half2x2(byte_perm(vc, vd, 0x7362))
                for g in range(4):
                    mma(st["o"][4 * w + g], a, b0[g], b1[g])
    # The warps' merge, the output's dimensions put back (column c of group d is c * HD/8 + d).
    m = np.full((WARPS, 16), -np.inf)
    l_ = np.zeros((WARPS, 16))
    acc = np.zeros((WARPS, 16, hd))
    for warp, st in enumerate(warps):
        for r in range(2):
            for lane in range(32):
                gid, tig = lane // 4, lane % 4
                row = gid + r * 8
                if row >= group:
                    continue
                quad = range((lane // 4) * 4, (lane // 4) * 4 + 4)
                m[warp, row] = st["mx"][r, lane]
                l_[warp, row] = sum(st["sm"][r, x] for x in quad)
                for d in range(hd // 8):
                    for e in range(2):
                        acc[warp, row, (tig * 2 + e) * (hd // 8) + d] = st["o"][d, lane, 2 * r + e]
    out = np.zeros((group, hd))
    for g in range(group):
        big = m[:, g].max()
        f = np.array([0.0 if m[w, g] == -np.inf else 2.0 ** (m[w, g] - big) for w in range(WARPS)])
        total = (l_[:, g] * f).sum()
        out[g] = (acc[:, g, :] * f[:, None]).sum(0) / total
    return out


def reference(q, k_bytes, v_bytes, scale):
    k, v = E4M3[k_bytes], E4M3[v_bytes]
    s = (q.astype(np.float64) @ k.T) * scale
    p = np.exp(s - s.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)) @ v


def main():
    failed = 0
    for hd in (64, 128, 256):
        worst = check_banks(hd)
        limit = 1 if hd < 256 else 2
        ok = worst <= limit
        failed += not ok
        print(f"hd {hd}: shared loads at most {worst}-way  {'ok' if ok else 'CONFLICTS'}")
    for hd, group, context in [(64, 3, 37), (128, 4, 130), (128, 16, 70), (256, 2, 65), (64, 12, 1), (128, 1, 200)]:
        q = bf(rng.uniform(-1, 1, (group, hd)))
        k_bytes = to_e4m3(rng.uniform(-2, 2, (context, hd)))
        v_bytes = to_e4m3(rng.uniform(-2, 2, (context, hd)))
        scale = 1 / np.sqrt(hd)
        got = kernel(hd, q, k_bytes, v_bytes, scale)
        want = reference(q, k_bytes, v_bytes, scale)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        ok = np.isfinite(err) and err < 2e-3
        failed += not ok
        print(f"hd {hd} group {group:>2} context {context:>3}: relative error {err:.2e}  {'ok' if ok else 'WRONG'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
