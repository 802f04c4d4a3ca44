// Prefill attention over the paged cache: causal, flash-style (FlashAttention-2 loop order), on
// the tensor cores (mma.sync m16n8k16, bf16 operands, float32 accumulation).
//
// One thread block takes a tile of up to PF_M consecutive query tokens of ONE sequence (a prefill
// chunk; `tiles` holds [sequence, first token row, tokens] per tile, built on the host) for ONE
// query head; each of its 4 warps owns 16 query rows. Keys and values stream through shared
// memory PF_N positions at a time, read through the sequence's block table, and every row keeps
// a running max and sum (online softmax, float32), so the scores never leave registers. Chunked
// prefill and prefix-cache hits need nothing special: a chunk's first position is read from
// `positions`, keys 0..position come from the cache (the chunk's own keys were written there by
// `rope_and_cache` before this runs), and the causal mask compares positions, not rows.
//
// Why one query head per block rather than the whole GQA group: the group's heads would have to
// share the 64 MMA rows (64 / group tokens each, awkward for groups 3 and 7, and every row a
// different position for the mask), or the block would hold group x 64 rows of accumulators,
// which does not fit in registers at head dim 128. With 64 query rows per block each key and
// value brought into shared memory already feeds 64 x head_dim x 4 flops, so the kernel is bound
// by the tensor cores and shared memory, not by L2; the grid puts the heads of one tile next to
// each other (blockIdx.x = head), so the `group` blocks that read the same KV head run together
// and all but the first find its keys and values in L2.
//
// Over an FP8 cache (`prefill_attention_fp8_hd*`: E4M3 bytes at scale 1) the tiles are copied raw
// into staging rows and turned into f16 tiles in one pass (E4M3 is exact in f16), and the products
// run on f16 operands (queries converted from bf16, probabilities packed as f16): the MMA loops are
// the bf16 kernel's. The pass and its barriers are a small cost in a kernel bound by its MMAs.
//
// Layouts as `paged_attention.cu`: q rows of `q_stride` elements holding [num_heads, HD] bf16;
// out [tokens, num_heads, HD] bf16; caches [num_blocks, num_kv_heads, block_size, HD] bf16 or
// E4M3; block_tables [num_seqs, max_blocks] u32; positions [tokens] u32.

#define PF_WARPS 4
#define PF_THREADS (PF_WARPS * 32)
#define PF_M (PF_WARPS * 16)  // query rows per block: 16 per warp, one MMA tile high
#define PF_N 64               // keys per shared-memory tile
// Rows in shared memory are padded by 16 bytes: ldmatrix reads 8 rows of 16 bytes at a time,
// and with a row stride of 16 bytes past a multiple of 128 those 8 rows fall in distinct banks.
#define PF_PAD 8

template <int HD, bool FP8>
__device__ void prefill_attention_impl(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,
                                       const typename KvElement<FP8>::T* __restrict__ k_cache,
                                       const typename KvElement<FP8>::T* __restrict__ v_cache, const u32* __restrict__ block_tables,
                                       const u32* __restrict__ positions, const u32* __restrict__ tiles, int q_stride,
                                       int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale,
                                       int window) {
    static_assert(PF_M == PF_N, "the query tile is staged through the value buffer");
    // Dynamic shared memory (`launch::prefill_shared_bytes`): at head_dim 256 the two tiles pass
    // the 48 KiB static limit.
    extern __shared__ __align__(16) unsigned char pf_smem[];
    // The tiles the MMAs read (bf16, or f16 bits over an FP8 cache), then over an FP8 cache the
    // raw rows the copies land in (`launch::prefill_shared_bytes`).
    __nv_bfloat16(*k_s)[HD + PF_PAD] = reinterpret_cast<__nv_bfloat16(*)[HD + PF_PAD]>(pf_smem);
    __nv_bfloat16(*v_s)[HD + PF_PAD] = k_s + PF_N;
    unsigned char(*k_raw)[HD] = reinterpret_cast<unsigned char(*)[HD]>(v_s + PF_N);
    unsigned char(*v_raw)[HD] = k_raw + PF_N;
    const int head = blockIdx.x, kv_head = head / (num_heads / num_kv_heads);
    const u32* tile = tiles + 3 * (u64)blockIdx.y;
    const int seq = tile[0], row0 = tile[1], len = tile[2];
    const int pos0 = positions[row0];
    const int last = pos0 + len - 1;  // the last key any row of this tile reads
    const u32* table = block_tables + (u64)seq * max_blocks;
    // The copies of tile j's keys (or values) as one group: straight into the tile, or into the
    // raw rows.
    auto load = [&](__nv_bfloat16(*tile)[HD + PF_PAD], unsigned char(*raw)[HD], const typename KvElement<FP8>::T* cache, int j) {
        if constexpr (FP8) {
            load_kv_rows<HD, PF_N, PF_THREADS>(raw, cache, table, j * PF_N, last + 1, num_kv_heads, kv_head, block_size);
        } else {
            load_kv_rows<HD, PF_N, PF_THREADS>(tile, cache, table, j * PF_N, last + 1, num_kv_heads, kv_head, block_size);
        }
        cp_async_commit();
    };
    auto load_k = [&](int j) { load(k_s, k_raw, k_cache, j); };
    auto load_v = [&](int j) { load(v_s, v_raw, v_cache, j); };
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tig = lane & 3, gid = lane >> 2;  // MMA fragment coordinates: column pair, row
    const int mat = lane >> 3, mrow = lane & 7;  // ldmatrix: which 8x8 matrix this lane addresses, which row
    const float scale_log2 = scale * 1.4426950408889634f;

    // The query tile (rows past `len` zero), staged through v_s, then held as A fragments.
    {
        constexpr int CHUNKS = HD / 8, ROWS = PF_THREADS / CHUNKS;
        const int c = threadIdx.x % CHUNKS;
#pragma unroll
        for (int i = 0; i < PF_M / ROWS; i++) {
            const int r = threadIdx.x / CHUNKS + i * ROWS;
            const bool valid = r < len;
            const __nv_bfloat16* src = valid ? q + (u64)(row0 + r) * q_stride + head * HD + c * 8 : q;
            cp_async_16(smem_addr(&v_s[r][c * 8]), src, valid);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
    }
    u32 qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        ldmatrix_x4(qf[kk], smem_addr(&v_s[warp * 16 + (mat & 1) * 8 + mrow][kk * 16 + (mat >> 1) * 8]));
        if constexpr (FP8) {
#pragma unroll
            for (int e = 0; e < 4; e++) qf[kk][e] = bf16x2_to_half2(qf[kk][e]);
        }
    }
    __syncthreads();  // v_s now holds values

    // With a sliding window (window > 0) row q sees keys q - window + 1 .. q: tiles wholly before
    // the tile's first row's window are never loaded.
    const int first_tile = window > 0 ? max(0, pos0 + 1 - window) / PF_N : 0;
    const int kv_tiles = last / PF_N + 1;
    load_k(first_tile);
    load_v(first_tile);

    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    // This thread's two rows: gid and gid + 8 of the warp's 16. Max in log2 units (scaled).
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    const int warp_first = pos0 + warp * 16;  // position of the warp's first row (rows past len
                                              // continue the positions; they are never stored)

    // Pipeline: K and V of a tile are separate copy groups, so the next K loads while this tile's
    // P.V runs and the next V while the next scores run. Over an FP8 cache each lands in its raw
    // rows, which are free again as soon as they are converted: the next K is copied during this
    // tile's scores, the next V during its P.V.
    for (int j = first_tile; j < kv_tiles; j++) {
        const int kv0 = j * PF_N;
        // Warp-uniform: tiles wholly after the warp's last row are skipped (causal), and tiles
        // wholly before its first row's window.
        const bool active = kv0 <= warp_first + 15 && (window <= 0 || kv0 + PF_N - 1 > warp_first - window);
        cp_async_wait<1>();  // K of tile j (V of tile j may still be in flight)
        __syncthreads();     // ... for every thread, and every warp is done with tile j - 1
        if constexpr (FP8) {
            e4m3_rows_to_half<HD, PF_N, PF_THREADS, HD, HD + PF_PAD>(k_s, k_raw);
            __syncthreads();
            if (j + 1 < kv_tiles) load_k(j + 1);
        }
        float s[PF_N / 8][4];
        if (active) {
#pragma unroll
            for (int n = 0; n < PF_N / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
                for (int np = 0; np < PF_N / 16; np++) {
                    // Matrices: keys np*16 + 0..7 then + 8..15, each at dims kk*16 + 0..7 and + 8..15.
                    u32 b[4];
                    ldmatrix_x4(b, smem_addr(&k_s[np * 16 + (mat >> 1) * 8 + mrow][kk * 16 + (mat & 1) * 8]));
                    mma_attention<FP8>(s[2 * np], qf[kk], b[0], b[1]);
                    mma_attention<FP8>(s[2 * np + 1], qf[kk], b[2], b[3]);
                }
            }
            // Causal mask, only on tiles that reach past the warp's first position; window mask, only
            // on tiles that reach below its last row's window.
            if (kv0 + PF_N - 1 > warp_first || (window > 0 && kv0 <= warp_first + 15 - window)) {
#pragma unroll
                for (int n = 0; n < PF_N / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = kv0 + n * 8 + tig * 2 + (e & 1);
                        const int query = warp_first + gid + (e >> 1) * 8;
                        if (key > query || (window > 0 && key <= query - window)) s[n][e] = -INFINITY;
                    }
            }
            // Online softmax; a row's values are spread over the 4 lanes of a quad.
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < PF_N / 8; n++) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                const float new_max = fmaxf(row_max[r], mx * scale_log2);
                // A row with nothing visible yet keeps zero weights rather than exp(-inf + inf).
                const float base = new_max == -INFINITY ? 0.0f : new_max;
                const float correction = exp2f(row_max[r] - base);
                row_max[r] = new_max;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < PF_N / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const float p = exp2f(s[n][2 * r + e] * scale_log2 - base);
                        s[n][2 * r + e] = p;
                        sum += p;
                    }
                row_sum[r] = row_sum[r] * correction + sum;  // this lane's share; summed at the end
#pragma unroll
                for (int d = 0; d < HD / 8; d++) {
                    o[d][2 * r] *= correction;
                    o[d][2 * r + 1] *= correction;
                }
            }
        }
        if constexpr (FP8) {
            if (j + 1 < kv_tiles) {
                cp_async_wait<1>();  // V of tile j (K of tile j + 1 may still be in flight)
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            e4m3_rows_to_half<HD, PF_N, PF_THREADS, HD, HD + PF_PAD>(v_s, v_raw);
            __syncthreads();
            if (j + 1 < kv_tiles) load_v(j + 1);
        } else {
            __syncthreads();  // every warp is done with k_s
            if (j + 1 < kv_tiles) {
                load_k(j + 1);
                cp_async_wait<1>();  // V of tile j
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
        }
        if (active) {
#pragma unroll
            for (int kk = 0; kk < PF_N / 16; kk++) {
                // The score accumulators of keys kk*16 .. +15 are already P's A fragment layout.
                const u32 a[4] = {pack_attention<FP8>(s[2 * kk][0], s[2 * kk][1]), pack_attention<FP8>(s[2 * kk][2], s[2 * kk][3]),
                                  pack_attention<FP8>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack_attention<FP8>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < HD / 16; dp++) {
                    // Transposed: keys kk*16 + 0..7 then + 8..15, at dims dp*16 + 0..7 and + 8..15.
                    u32 b[4];
                    ldmatrix_x4_trans(b, smem_addr(&v_s[kk * 16 + (mat & 1) * 8 + mrow][dp * 16 + (mat >> 1) * 8]));
                    mma_attention<FP8>(o[2 * dp], a, b[0], b[1]);
                    mma_attention<FP8>(o[2 * dp + 1], a, b[2], b[3]);
                }
            }
        }
        if constexpr (!FP8) {
            __syncthreads();  // every warp is done with v_s
            if (j + 1 < kv_tiles) load_v(j + 1);
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const int i = warp * 16 + gid + r * 8;
        if (i < len) {
            const float inv = 1.0f / sum;
            __nv_bfloat16* dst = out + ((u64)(row0 + i) * num_heads + head) * HD + tig * 2;
#pragma unroll
            for (int d = 0; d < HD / 8; d++)
                *reinterpret_cast<u32*>(dst + d * 8) = pack_bf16(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
        }
    }
}

#define PREFILL_KERNEL(HD)                                                                                      \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_attention_hd##HD(                        \
        __nv_bfloat16* out, const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache, \
        const u32* block_tables, const u32* positions, const u32* tiles, int q_stride, int max_blocks,          \
        int num_heads, int num_kv_heads, int block_size, float scale, int window) { PDL_ENTER();                             \
        prefill_attention_impl<HD, false>(out, q, k_cache, v_cache, block_tables, positions, tiles, q_stride,  \
                                          max_blocks, num_heads, num_kv_heads, block_size, scale, window);      \
    }
// Over an FP8 cache (E4M3 bytes; sm_89 on).
#define PREFILL_FP8_KERNEL(HD)                                                                                  \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_attention_fp8_hd##HD(                    \
        __nv_bfloat16* out, const __nv_bfloat16* q, const unsigned char* k_cache, const unsigned char* v_cache, \
        const u32* block_tables, const u32* positions, const u32* tiles, int q_stride, int max_blocks,          \
        int num_heads, int num_kv_heads, int block_size, float scale, int window) {                             \
        PDL_ENTER();                                                                                            \
        prefill_attention_impl<HD, true>(out, q, k_cache, v_cache, block_tables, positions, tiles, q_stride,   \
                                         max_blocks, num_heads, num_kv_heads, block_size, scale, window);       \
    }
PREFILL_KERNEL(64)
PREFILL_KERNEL(128)
PREFILL_KERNEL(256)
PREFILL_FP8_KERNEL(64)
PREFILL_FP8_KERNEL(128)
PREFILL_FP8_KERNEL(256)
