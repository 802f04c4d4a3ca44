# Emulates kernels/prefill_attention.cu lane by lane on the CPU (numpy), with the ldmatrix and
# mma.sync m16n8k16 fragment layouts as the PTX ISA defines them, and compares it with plain
# float64 attention over a paged cache. It checks the kernel's index arithmetic (fragments, the
# causal mask, the online softmax, partial tiles, chunked prefill) on a machine without a GPU; it
# does not model the cp.async pipeline or barriers, which only the GPU check (`pagedserve check`)
# covers. Run: python3 kernels/emulate/prefill_attention.py (about 5 s). Keep it in step with
# the kernel when either changes.
import numpy as np
from fragments import bf, ldmatrix_x4, mma
rng = np.random.default_rng(0)
PF_M = PF_N = 64
def kernel(HD, out, q, q_stride, kc, vc, table, positions, tile, head, num_heads, num_kv_heads, bs, scale):
    PAD = 8
    kv_head = head // (num_heads // num_kv_heads)
    seq, row0, ln = tile
    pos0 = positions[row0]; last = pos0 + ln - 1
    scale_log2 = scale * 1.4426950408889634
    def load_tile(cache, kv0):
        s = np.full((PF_N, HD + PAD), np.nan, np.float32)
        for r in range(PF_N):
            p = kv0 + r
            if p <= last:
                s[r, :HD] = cache[table[p // bs], kv_head, p % bs]
            else: s[r, :HD] = 0
        return s
    vs = np.full((PF_N, HD + PAD), np.nan, np.float32)
    for r in range(PF_M):
        vs[r, :HD] = q[row0 + r, head*HD:(head+1)*HD] if r < ln else 0
    warps = []
    for warp in range(4):
        qf = []
        for kk in range(HD // 16):
            addr = [(warp*16 + ((lane>>3) & 1)*8 + (lane & 7), kk*16 + ((lane>>3) >> 1)*8) for lane in range(32)]
            qf.append(ldmatrix_x4(vs, addr))
        warps.append(dict(qf=qf, o=np.zeros((HD//8, 32, 4)), mx=np.full((2, 32), -np.inf), sm=np.zeros((2, 32))))
    kv_tiles = last // PF_N + 1
    for j in range(kv_tiles):
        kv0 = j * PF_N
        ks = load_tile(kc, kv0); vs = load_tile(vc, kv0)
        for warp in range(4):
            W = warps[warp]
            warp_first = pos0 + warp * 16
            if not (kv0 <= warp_first + 15): continue
            s = np.zeros((PF_N//8, 32, 4))
            for kk in range(HD // 16):
                for np_ in range(PF_N // 16):
                    addr = [(np_*16 + ((lane>>3) >> 1)*8 + (lane & 7), kk*16 + ((lane>>3) & 1)*8) for lane in range(32)]
                    b = ldmatrix_x4(ks, addr)
                    a = W['qf'][kk]
                    s0 = [list(x) for x in s[2*np_]]; mma(s0, a, b[0], b[1]); s[2*np_] = s0
                    s1 = [list(x) for x in s[2*np_+1]]; mma(s1, a, b[2], b[3]); s[2*np_+1] = s1
            if kv0 + PF_N - 1 > warp_first:
                for n in range(PF_N//8):
                    for lane in range(32):
                        tig, gid = lane & 3, lane >> 2
                        for e in range(4):
                            key = kv0 + n*8 + tig*2 + (e & 1); query = warp_first + gid + (e >> 1)*8
                            if key > query: s[n][lane][e] = -np.inf
            for r in range(2):
                mx = np.max(np.maximum(s[:, :, 2*r], s[:, :, 2*r+1]), axis=0)  # per lane
                mx = np.maximum(mx, mx[np.arange(32) ^ 1]); mx = np.maximum(mx, mx[np.arange(32) ^ 2])
                new = np.maximum(W['mx'][r], mx * scale_log2)
                base = np.where(new == -np.inf, 0, new)
                corr = np.exp2(W['mx'][r] - base)
                W['mx'][r] = new
                p = np.exp2(s[:, :, 2*r:2*r+2] * scale_log2 - base[None, :, None])
                s[:, :, 2*r:2*r+2] = p
                W['sm'][r] = W['sm'][r] * corr + p.sum(axis=(0, 2))
                W['o'][:, :, 2*r:2*r+2] *= corr[None, :, None]
            for kk in range(PF_N // 16):
                a = np.zeros((4, 32, 2))
                a[0] = bf(s[2*kk][:, 0:2]); a[1] = bf(s[2*kk][:, 2:4]); a[2] = bf(s[2*kk+1][:, 0:2]); a[3] = bf(s[2*kk+1][:, 2:4])
                for dp in range(HD // 16):
                    addr = [(kk*16 + ((lane>>3) & 1)*8 + (lane & 7), dp*16 + ((lane>>3) >> 1)*8) for lane in range(32)]
                    b = ldmatrix_x4(vs, addr, trans=True)
                    o0 = [list(x) for x in W['o'][2*dp]]; mma(o0, a, b[0], b[1]); W['o'][2*dp] = o0
                    o1 = [list(x) for x in W['o'][2*dp+1]]; mma(o1, a, b[2], b[3]); W['o'][2*dp+1] = o1
    for warp in range(4):
        W = warps[warp]
        for r in range(2):
            sm = W['sm'][r]; sm = sm + sm[np.arange(32) ^ 1]; sm = sm + sm[np.arange(32) ^ 2]
            for lane in range(32):
                tig, gid = lane & 3, lane >> 2
                i = warp*16 + gid + r*8
                if i < ln:
                    for d in range(HD // 8):
                        base = head*HD + d*8 + tig*2
                        out[row0 + i, base:base+2] = W['o'][d][lane][2*r:2*r+2] / sm[lane]

def check(HD, heads, kv_heads, cached, new, bs=16):
    ctx = cached + new
    nblocks = (ctx + bs - 1) // bs + 3
    perm = rng.permutation(nblocks)
    table = perm[:(ctx + bs - 1)//bs]
    kc = bf(rng.uniform(-1, 1, (nblocks, kv_heads, bs, HD))); vc = bf(rng.uniform(-1, 1, (nblocks, kv_heads, bs, HD)))
    q = bf(rng.uniform(-1, 1, (new, heads*HD)))
    positions = np.arange(cached, ctx)
    out = np.full((new, heads*HD), np.nan)
    scale = 1/np.sqrt(HD)
    tiles = [(0, f, min(64, new - f)) for f in range(0, new, 64)]
    for t in tiles:
        for h in range(heads):
            kernel(HD, out, q, heads*HD, kc, vc, table, positions, t, h, heads, kv_heads, bs, scale)
    # reference
    group = heads // kv_heads
    ref = np.zeros_like(out)
    K = np.stack([kc[table[p//bs], :, p % bs] for p in range(ctx)])  # ctx, kvh, HD
    V = np.stack([vc[table[p//bs], :, p % bs] for p in range(ctx)])
    for i in range(new):
        for h in range(heads):
            kvh = h // group; P = positions[i] + 1
            sc = K[:P, kvh] @ q[i, h*HD:(h+1)*HD] * scale
            w = np.exp(sc - sc.max()); w /= w.sum()
            ref[i, h*HD:(h+1)*HD] = w @ V[:P, kvh]
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"HD {HD} heads {heads}/{kv_heads} cached {cached} new {new}: rel err {err:.2e}")

    return err

errors = [check(64, 3, 1, 0, 1), check(64, 3, 1, 0, 17), check(128, 2, 1, 0, 100), check(64, 2, 2, 200, 37),
          check(64, 1, 1, 5, 70), check(128, 1, 1, 70, 64), check(64, 1, 1, 0, 130, bs=32)]
assert all(e < 1e-2 for e in errors), errors
print("ok")
