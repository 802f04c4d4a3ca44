// Products of 9-64 rows with bf16 weights on the tensor cores: out[m, n] = x[m, :] · W[n, :],
// bf16 x and W (row-major, K a multiple of 64), float32 accumulation, bf16 or float32 out. At
// these sizes a product is still a weight stream (N·K·2 bytes against at most 64·K·2 of input),
// which cuBLAS reads at about 83% of the copy rate on the 8B shape at 32 rows (H200,
// BENCHMARKS.md session 17); this kernel is built the way the GEMV is, to keep the weight
// stream going:
//
//  * the work is a flat sequence of (tile, k-step) iterations: SK_BN = 128 weight rows a tile,
//    SK_BK = 64 k a step, tile-major; block b of the G launched (one a multiprocessor, G at most
//    the iterations) takes the b-th of G equal contiguous ranges ("stream-K"), so every
//    multiprocessor streams the same number of bytes whatever the shape's tile count;
//  * a block's weight tiles and input slices go through a ring of STAGES stages in shared memory
//    filled by cp.async, the next tile's first steps following the last ones of the current
//    without a break, so STAGES - 1 weight steps (16 KB each) stay in flight: as many as fit in
//    about 216 KB beside the input slices (12, 10 and 9 stages for 16, 32 and 64 rows: 176, 144
//    and 128 KB of weights in flight a multiprocessor, which the GEMV found to be what a
//    decode-sized product is bound by); the first are issued before the programmatic-dependent
//    wait;
//  * each of the 8 warps takes 16 of the tile's rows as the A operand of m16n8k16 MMAs (one
//    ldmatrix.x4 a k16 step) against every 8-token group of the input as B (ldmatrix.x4 for two
//    groups), so a weight element is read from shared memory once for all the rows of x;
//  * a tile whose iterations a block runs alone is written directly. A tile shared by several
//    blocks (at most one at each end of a block's range) gets each one's float32 partial in
//    `partials` (two slots a block: the tile its range starts in, and the one it ends in), and
//    the block that counts in last in `counters[tile]` sums them in block order, so the result
//    does not depend on which block finished first, writes the tile and resets the counter to
//    zero for the next launch.
//
// Shared tiles are [rows][64] bf16, 128 bytes a row, with 16-byte chunk c of row r stored at
// chunk c ^ (r & 7): the 8 rows an ldmatrix matrix reads at one column land in 8 different bank
// groups. Rows past n (weights) and past m (input) are copied as zeros and never stored.
// `kernels/emulate/skinny_gemm.py` replays the index arithmetic (swizzle, fragments, ranges and
// the fix-up) on the CPU.

#define SK_THREADS 256
#define SK_WARPS 8
#define SK_BN 128  // weight rows a tile: 16 a warp
#define SK_BK 64   // k a step

// Byte offset of 16-byte chunk c (0..7) of row r in a [rows][64] bf16 tile.
__device__ __forceinline__ u32 sk_offset(int r, int c) { return (u32)(r * 128 + ((c ^ (r & 7)) << 4)); }

// The block whose range holds iteration `it` of `total`, over `blocks` blocks: the largest b with
// b * total / blocks <= it.
__device__ __forceinline__ u64 sk_block_of(u64 it, u64 total, u64 blocks) { return ((it + 1) * blocks - 1) / total; }

// NT groups of 8 input rows (m <= 8 * NT), NT even; STAGES ring stages (`launch::skinny_stages`).
template <int NT, int STAGES>
__device__ void skinny_gemm_impl(void* __restrict__ out, int out_f32, const __nv_bfloat16* __restrict__ x,
                                 const __nv_bfloat16* __restrict__ w, int m, int n, int k, float* __restrict__ partials,
                                 u32* __restrict__ counters) {
    extern __shared__ __align__(128) unsigned char sk_smem[];
    __shared__ int sk_last;
    constexpr int W_BYTES = SK_BN * SK_BK * 2, X_BYTES = NT * 8 * SK_BK * 2, STAGE = W_BYTES + X_BYTES;
    constexpr int TILE = SK_BN * NT * 8;  // floats of a partial: [token][row]
    const u32 base = smem_addr(sk_smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int steps = k / SK_BK;
    const u64 tiles = (n + SK_BN - 1) / SK_BN, total = tiles * steps, blocks = gridDim.x, b = blockIdx.x;
    const u64 lo = b * total / blocks, hi = (b + 1) * total / blocks;

    auto copy_w = [&](int stage, u64 it) {
        const u64 t = it / steps;
        const int s = (int)(it % steps);
        const u32 dst = base + stage * STAGE;
#pragma unroll
        for (int i = 0; i < SK_BN * 8 / SK_THREADS; i++) {
            const int idx = tid + i * SK_THREADS, r = idx >> 3, c = idx & 7;
            const u64 row = t * SK_BN + r;
            const bool valid = row < (u64)n;
            cp_async_16(dst + sk_offset(r, c), w + (valid ? row : 0) * k + s * SK_BK + c * 8, valid);
        }
    };
    auto copy_x = [&](int stage, u64 it) {
        const int s = (int)(it % steps);
        const u32 dst = base + stage * STAGE + W_BYTES;
        for (int idx = tid; idx < NT * 8 * 8; idx += SK_THREADS) {
            const int r = idx >> 3, c = idx & 7;
            const bool valid = r < m;
            cp_async_16(dst + sk_offset(r, c), x + (u64)(valid ? r : 0) * k + s * SK_BK + c * 8, valid);
        }
    };
    // Weights first: they depend on no earlier kernel. Group 0 then holds every early weight
    // step and the first input slice, group s the input slice of step s.
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++)
        if (lo + s < hi) copy_w(s, lo + s);
    pdl_wait();  // x, and the counters and partials of the product before
    pdl_trigger();
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (lo + s < hi) copy_x(s, lo + s);
        cp_async_commit();
    }

    // Where one accumulator element lands: weight row (in the tile) and input row (token).
    auto row_of = [&](int e) { return warp * 16 + gid + (e >> 1) * 8; };
    auto token_of = [&](int j, int e) { return j * 8 + tig * 2 + (e & 1); };
    auto store = [&](u64 t, int r, int token, float v) {
        const u64 row = t * SK_BN + r;
        if (row >= (u64)n || token >= m) return;
        const u64 at = (u64)token * n + row;
        if (out_f32) reinterpret_cast<float*>(out)[at] = v;
        else reinterpret_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16(v);
    };

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const int mat = lane >> 3, mrow = lane & 7;
    for (u64 it = lo; it < hi; it++) {
        const int i = (int)(it - lo), stage = i % STAGES;
        cp_async_wait<STAGES - 2>();  // step `it` has landed
        __syncthreads();                 // ... for every thread, and every warp is done with it - 1
        {
            const u64 next = it + STAGES - 1;
            const int next_stage = (i + STAGES - 1) % STAGES;
            if (next < hi) {
                copy_w(next_stage, next);
                copy_x(next_stage, next);
            }
            cp_async_commit();
        }
        const u32 ws = base + stage * STAGE, xs = ws + W_BYTES;
#pragma unroll
        for (int s = 0; s < SK_BK / 16; s++) {
            // A: this warp's 16 rows at k 16s..16s+15 (matrices: rows 0-7 then 8-15, k low then high).
            u32 a[4];
            ldmatrix_x4(a, ws + sk_offset(warp * 16 + (mat & 1) * 8 + mrow, s * 2 + (mat >> 1)));
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                // B of token groups j and j + 1 (matrices: group j k low, k high, then j + 1).
                u32 bq[4];
                ldmatrix_x4(bq, xs + sk_offset((j + (mat >> 1)) * 8 + mrow, s * 2 + (mat & 1)));
                mma_bf16(acc[j], a, bq[0], bq[1]);
                mma_bf16(acc[j + 1], a, bq[2], bq[3]);
            }
        }

        const u64 t = it / steps;
        if ((it + 1) % steps != 0 && it + 1 != hi) continue;  // block-uniform: the tile goes on
        // The end of this block's part of tile t.
        const bool whole = lo <= t * steps && it + 1 == (t + 1) * steps;
        if (whole) {
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) store(t, row_of(e), token_of(j, e), acc[j][e]);
        } else {
            const int slot = t == lo / steps ? 0 : 1;
            float* mine = partials + (b * 2 + slot) * TILE;
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) mine[token_of(j, e) * SK_BN + row_of(e)] = acc[j][e];
            __threadfence();  // the partial is visible before the count says so
            __syncthreads();
            if (tid == 0) {
                const u64 first = sk_block_of(t * steps, total, blocks), last = sk_block_of((t + 1) * steps - 1, total, blocks);
                sk_last = atomicAdd(&counters[t], 1u) == (u32)(last - first);
            }
            __syncthreads();
            if (sk_last) {
                __threadfence();  // every other block's partial, as their counts promised
                const u64 first = sk_block_of(t * steps, total, blocks), last = sk_block_of((t + 1) * steps - 1, total, blocks);
                for (int e = tid; e < TILE; e += SK_THREADS) {
                    float sum = 0.0f;
                    for (u64 bb = first; bb <= last; bb++) {
                        const int bb_slot = t == (bb * total / blocks) / steps ? 0 : 1;
                        sum += __ldcg(partials + (bb * 2 + bb_slot) * TILE + e);
                    }
                    store(t, e % SK_BN, e / SK_BN, sum);
                }
                if (tid == 0) counters[t] = 0;
            }
        }
#pragma unroll
        for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    }
    cp_async_wait<0>();
}

#define SKINNY_KERNEL(ROWS, STAGES)                                                                        \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) skinny_gemm_m##ROWS(                          \
        void* out, int out_f32, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n, int k,      \
        float* partials, u32* counters) {                                                                  \
        skinny_gemm_impl<ROWS / 8, STAGES>(out, out_f32, x, w, m, n, k, partials, counters);               \
    }
SKINNY_KERNEL(16, 12)
SKINNY_KERNEL(32, 10)
SKINNY_KERNEL(64, 9)
