// Paged attention for decode tokens: every query token attends to positions 0..=pos of its own
// sequence, reading keys and values through the sequence's block table. In a batch that mixes
// prefill chunks and decode tokens, the chunks go to `prefill_attention.cu` and this kernel takes
// only the decode tokens: block x handles token `rows[x]`; with `rows` null (decode-only batches,
// CUDA graphs) block x handles token x.
//
// One thread block per (token, KV head, split). The KV head's group of query heads are the rows of
// an MMA tile (m16n8k16 bf16 on the tensor cores, float32 accumulation; heads past the group are
// zero rows), so each key and value is read once per group. Keys and values stream through a
// STAGES-deep ring of shared-memory tiles filled by cp.async: the block keeps whole tiles of
// the cache in flight while it computes on an earlier one, because a decode kernel is bound by the
// bytes each multiprocessor has in flight, not by arithmetic. (The CUDA-core kernel this replaced,
// one key per lane with loads issued from registers, reached 58% of the copy bandwidth on the 8B
// layout; this one 78%.) Each of the 4 warps takes 16 keys of each tile with its own online
// softmax (FlashAttention-2 loop order, as in `prefill_attention.cu`), and the warps' states are
// merged at the end. Long contexts are cut into `num_splits` partitions processed by separate
// blocks (split-K, "flash decoding"), whose partial results `attention_reduce_hd*` merges.
//
// At short contexts the kernel was bound by instruction issue, not by memory (ncu, 8B layout,
// batch 256, context 512, H200: 51% of DRAM bandwidth, the top stall a fixed-latency dependency,
// 3 warps a scheduler): a block stages its partition's block-table entries in shared memory, a
// key and its value share one address computation with one division per tile, and the scores'
// MMAs run in two chains. That took the launch from 234 to 156 us (74% of DRAM bandwidth) and
// at context 2048 from 790 to 550 us.
//
// RoPE and the cache write fused (`inv_freq` not null; batches of decode tokens only, each its
// sequence's only token, as `rope_and_cache` would leave them): every block rotates its group's
// query heads itself into shared memory, and the one block whose partition holds the token's own
// position rotates the token's key and writes it and the value into the cache slot `slots[t]`
// before it loads a tile; no other block of a real token reads that position. (A CUDA graph's idle
// padding rows all write and read one slot of the block no sequence is given: their outputs are
// never used, as they were not before.) The QKV buffer is left as it is. Where the QKV product
// was split over K (`qkv_partials` not null, `launch::split_k_splits`), the kernel reads its
// float32 partials instead and sums them as it reads (`QkvRow`); the bf16 buffer is never written.
//
// Over an FP8 cache (`paged_attention_fp8_hd*`: E4M3 bytes at scale 1, `KvCacheDtype::Fp8E4M3`)
// the ring holds the raw bytes, half a bf16 tile's, and there is no ldmatrix: each lane reads its
// own bytes of the keys and values its MMA fragments need with 8- or 16-byte shared loads and
// turns each pair into f16 with one instruction (E4M3 is exact in f16), so the products run on f16
// operands (queries converted from bf16 once a block, probabilities packed as f16). For that the
// head dimensions are permuted, consistently for queries and keys in the scores and undone for
// the output (see the loops); `kernels/emulate/paged_attention_fp8.py` replays these maps.
//
// Layouts: q rows of `q_stride` elements holding [num_heads, HD] bf16 (the Q part of the QKV
// projection's output; with RoPE fused, the whole row: Q heads, then K heads, then V heads); out
// [tokens, num_heads, HD] bf16; caches [num_blocks, num_kv_heads, block_size, HD] bf16 or E4M3;
// block_tables [num_seqs, max_blocks] u32; partials (split-K only) float [tokens, num_heads,
// num_splits, HD] plus max (log2 units of the scaled scores) and sum [tokens, num_heads,
// num_splits]; slots (RoPE fused) u32 [tokens].

#define ATTENTION_PARAMS(CACHE)                                                                            \
    __nv_bfloat16 *out, float *part_out, float *part_max, float *part_sum, const __nv_bfloat16 *q,         \
        CACHE *k_cache, CACHE *v_cache, const u32 *block_tables,                                           \
        const u32 *token_seq, const u32 *positions, const u32 *rows, int q_stride, int max_blocks,         \
        int num_heads, int num_kv_heads, int block_size, float scale, int partition, int window,          \
        const u32 *slots, const float *inv_freq, float position_scale, int rotary_dim, float magnitude,    \
        const float *qkv_partials, int qkv_splits, u64 qkv_split_stride, const unsigned char *l2_prefetch, \
        u64 l2_prefetch_bytes, int kv_evict_first
#define ATTENTION_ARGS                                                                                     \
    out, part_out, part_max, part_sum, q, k_cache, v_cache, block_tables, token_seq, positions, rows,      \
        q_stride, max_blocks, num_heads, num_kv_heads, block_size, scale, partition, window, slots,        \
        inv_freq, position_scale, rotary_dim, magnitude, qkv_partials, qkv_splits, qkv_split_stride,        \
        l2_prefetch, l2_prefetch_bytes, kv_evict_first
#define DC_WARPS 4
#define DC_THREADS (DC_WARPS * 32)
#define DC_N (DC_WARPS * 16)  // keys per tile
#define DC_PAD 8              // row padding: 8 consecutive rows of a tile fall in distinct banks
#define DC_TABLE 256          // block-table entries a block stages in shared memory (after the ring)
// Tiles in the ring (the kernel's STAGES), chosen per head dim on the H100. Head dim 128: two, so
// a block takes 70 KB and three blocks share a multiprocessor (8B layout, batch 64, context 2048:
// 2 stages gave 75% of the copy bandwidth, 3 stages with two blocks per SM 71%, 4 stages with one
// block 42%). Head dim 64: four (74 KB, three blocks per SM), whose tiles are half as large
// (SmolLM2 layout, batch 256, context 512: 1970 GB/s against 1700 with 2 stages).

// A stretch of one token's unrotated QKV row, as the fused RoPE reads it: the QKV product's bf16
// values, or, where that product was left as float32 partials over slices of K (`part` not null:
// `qkv_splits` blocks `qkv_split_stride` floats apart, each laid out as the bf16 rows), their sum
// in split order rounded to bf16, the value `sum_partials_bf16` would have written there.
struct QkvRow {
    const __nv_bfloat16* row;
    const float* part;
    int splits;
    u64 split_stride;
    __device__ __forceinline__ float operator[](int j) const {
        if (part == nullptr) return __bfloat162float(row[j]);
        float v = 0.0f;
        for (int s = 0; s < splits; s++) v += part[(u64)s * split_stride + j];
        return __bfloat162float(__float2bfloat16(v));
    }
    __device__ __forceinline__ QkvRow at(u64 offset) const {
        return QkvRow{row + offset, part ? part + offset : nullptr, splits, split_stride};
    }
};

// Dimension pair j (of HD / 2) of one head from `src` to `dst` (bf16, or E4M3 bytes in an FP8
// cache): below rotary_dim / 2, RoPE's pair (j, j + rotary_dim / 2) rotated to position `pos`;
// above, two consecutive dimensions past rotary_dim, copied.
template <typename T>
__device__ __forceinline__ void rope_pair(const QkvRow& src, T* dst, int j, int rotary_dim, float pos,
                                          const float* inv_freq, float magnitude) {
    const int half = rotary_dim / 2;
    if (j < half) {
        rope_rotate(src[j], src[j + half], pos * inv_freq[j], magnitude, dst[j], dst[j + half]);
    } else {
        const int a = rotary_dim + 2 * (j - half);
        store_cache_value(dst[a], src[a]);
        store_cache_value(dst[a + 1], src[a + 1]);
    }
}

// Shared-memory rows of the ring, in bytes. A bf16 cache: HD + DC_PAD elements for keys and
// values alike, read by ldmatrix. An FP8 cache: raw E4M3 rows that each lane reads its own bytes
// of (see `paged_decode_impl`), keys HD + 16 bytes apart (HD 64: HD) and values HD + 16, the
// strides at which those reads meet no bank conflict at head dims 64 and 128 (256: two-way).
template <int HD, bool FP8>
struct DecodeRows {
    static constexpr int K = FP8 ? HD + (HD == 64 ? 0 : 16) : (HD + DC_PAD) * 2;
    static constexpr int V = FP8 ? HD + 16 : (HD + DC_PAD) * 2;
};

template <int HD, int STAGES, bool FP8>
__device__ void paged_decode_impl(ATTENTION_PARAMS(typename KvElement<FP8>::T)) {
    typedef typename KvElement<FP8>::T C;  // the cache's element: bf16, or an E4M3 byte
    typedef __nv_bfloat16 Row[HD + DC_PAD];
    constexpr int K_BYTES = DecodeRows<HD, FP8>::K, V_BYTES = DecodeRows<HD, FP8>::V;
    typedef C KRow[K_BYTES / sizeof(C)];
    typedef C VRow[V_BYTES / sizeof(C)];
    extern __shared__ __align__(16) unsigned char dc_smem[];
    KRow* k_s = reinterpret_cast<KRow*>(dc_smem);  // [STAGES * DC_N]
    VRow* v_s = reinterpret_cast<VRow*>(dc_smem + STAGES * DC_N * K_BYTES);
    const int t = rows ? rows[blockIdx.x] : blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
    const int group = num_heads / num_kv_heads;
    const int context = positions[t] + 1;
    // A sliding window (window > 0) sees the last `window` positions; splits cover only those.
    const int first = window > 0 ? max(0, context - window) : 0;
    const int begin = first + split * partition;
    // In 64 bits: without split-K `partition` is INT_MAX, and `begin` may be past 0.
    const int end = (int)min((long long)context, (long long)begin + partition);
    const int num_tiles = end > begin ? (end - begin + DC_N - 1) / DC_N : 0;
    const u32* seq_table = block_tables + (u64)token_seq[t] * max_blocks;
    // The partition's stretch of the block table, staged in shared memory when it fits, so that
    // a tile's cp.async addresses wait on a shared load, not on a global one, at every tile.
    const int table_base = begin / block_size;
    const int table_len = num_tiles > 0 ? (end - 1) / block_size - table_base + 1 : 0;
    const u32* table = seq_table;
    int base = 0;
    if (table_len <= DC_TABLE) {
        u32* table_s = reinterpret_cast<u32*>(dc_smem + STAGES * DC_N * (K_BYTES + V_BYTES));
        for (int i = threadIdx.x; i < table_len; i += DC_THREADS) table_s[i] = seq_table[table_base + i];
        __syncthreads();
        table = table_s, base = table_base;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tig = lane & 3, gid = lane >> 2;  // MMA fragment coordinates: column pair, row
    const int mat = lane >> 3, mrow = lane & 7;  // ldmatrix: which 8x8 matrix this lane addresses, which row
    const float scale_log2 = scale * 1.4426950408889634f;

    const bool rope = inv_freq != nullptr;
    // With RoPE fused, the block holding the token's own position writes its key and value first.
    const bool writes_token = rope && begin <= context - 1 && context - 1 < end;
    // A decode step reads each key and value once (one block a KV head and partition): with
    // `kv_evict_first` they stream through L2 under evict-first, so they do not push out the
    // o-projection's weights this kernel prefetched (`l2_prefetch`) or the activations.
    const u64 policy = kv_evict_first ? l2_evict_first_policy() : 0;
    // Tile `tile` of the partition (keys and values) into ring stage `stage`.
    auto copy_tile = [&](int stage, int tile) {
        copy_cache_rows<HD, DC_N, DC_THREADS, K_BYTES / sizeof(C), true, V_BYTES / sizeof(C)>(
            k_s + stage * DC_N, v_s + stage * DC_N, k_cache, v_cache, table, begin + tile * DC_N, end, num_kv_heads,
            kv_head, block_size, base, kv_evict_first != 0, policy);
    };
    auto start_copies = [&]() {
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) {
            if (s < num_tiles) copy_tile(s, s);
            cp_async_commit();  // empty groups too: the wait counts below assume one group per tile
        }
    };
    // Start the copies first: the query fragments below are loaded while they are in flight.
    // With RoPE fused, a block whose partition does not hold the token's own position reads
    // only cache rows of earlier steps, which no kernel of this step writes: under a
    // programmatic dependent launch its copies go out before the wait for the QKV product, as
    // do the index reads above (the host's, uploaded before the step).
    if (rope && !writes_token) start_copies();
    PDL_ENTER();
    if (!rope) start_copies();

    const __nv_bfloat16* q_row = q + (u64)t * q_stride + (u64)kv_head * group * HD;
    // The rotated query rows (bf16), with RoPE fused: in the last stage's key tile, which the
    // first copies leave free until the loop's first iteration (after its barrier) refills it.
    // (An FP8 key tile of 64 rows of HD bytes holds the 16 rows of HD + DC_PAD halves.)
    Row* q_s = reinterpret_cast<Row*>(k_s + (STAGES - 1) * DC_N);
    static_assert(16 * sizeof(Row) <= DC_N * K_BYTES, "the rotated queries fit in a key tile");
    if (rope) {
        const float pos = (float)positions[t] / position_scale;
        const QkvRow qkv = {q + (u64)t * q_stride, qkv_partials ? qkv_partials + (u64)t * q_stride : nullptr, qkv_splits, qkv_split_stride};
        if (writes_token) {
            // The token's key (rotated) and value into its slot: one dimension pair per thread.
            const QkvRow k_row = qkv.at((u64)num_heads * HD + (u64)kv_head * HD);
            const QkvRow v_row = k_row.at((u64)num_kv_heads * HD);
            const u64 slot = slots[t];
            const u64 at = (((slot / block_size) * num_kv_heads + kv_head) * block_size + slot % block_size) * HD;
            for (int j = threadIdx.x; j < HD / 2; j += DC_THREADS) rope_pair(k_row, k_cache + at, j, rotary_dim, pos, inv_freq, magnitude);
            for (int d = threadIdx.x; d < HD; d += DC_THREADS) store_cache_value(v_cache[at + d], v_row[d]);
        }
        // The group's query heads rotated, one dimension pair per thread (rows past the group
        // are never read).
        for (int p = threadIdx.x; p < group * (HD / 2); p += DC_THREADS)
            rope_pair(qkv.at((u64)(kv_head * group + p / (HD / 2)) * HD), q_s[p / (HD / 2)], p % (HD / 2), rotary_dim, pos, inv_freq, magnitude);
        __syncthreads();  // the rotated queries, and the token's cache row for this block's copies
        if (writes_token) start_copies();
    }

    // A fragments of the query rows: row r is head kv_head * group + r, zero for r >= group.
    // Over an FP8 cache the head dimensions are permuted, the same way for queries and keys (a
    // dot product does not care): slice kk's columns tig * 2 + {0, 1, 8, 9} are dimensions
    // tig * HD / 4 + kk * 4 + {0, 1, 2, 3}, so that each lane's share of a key row is HD / 4
    // consecutive bytes, read with 16-byte loads and turned into the B fragments as they are.
    u32 qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = gid + (e & 1) * 8;
            const int col = FP8 ? tig * (HD / 4) + kk * 4 + (e >> 1) * 2 : kk * 16 + (e >> 1) * 8 + tig * 2;
            const u32* at = rope ? reinterpret_cast<const u32*>(&q_s[r][col]) : reinterpret_cast<const u32*>(q_row + r * HD + col);
            const u32 pair = r < group ? *at : 0u;
            qf[kk][e] = FP8 ? bf16x2_to_half2(pair) : pair;
        }

    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    // This thread's two rows, gid and gid + 8; maxima in log2 units of the scaled scores.
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    const bool upper_rows = group > 8;  // rows 8..15 hold heads only for groups above 8

    for (int i = 0; i < num_tiles; i++) {
        cp_async_wait<STAGES - 2>();  // tile i has landed
        __syncthreads();              // ... for every thread, and every warp is done with tile i - 1
        {
            const int next = i + STAGES - 1, stage = next % STAGES;
            if (next < num_tiles) copy_tile(stage, next);
            cp_async_commit();
        }
        const int key0 = begin + i * DC_N + warp * 16;  // this warp's first key
        if (key0 >= end) continue;                      // warp-uniform: past the partition's end
        const KRow* ks = k_s + (i % STAGES) * DC_N + warp * 16;
        const VRow* vs = v_s + (i % STAGES) * DC_N + warp * 16;

        // Scores of keys 0..7 and 8..15, each summed over the head dim in two chains (even and odd
        // 16-dim slices) added at the end: one chain of HD / 16 dependent MMAs left the warps
        // waiting on the tensor cores' latency (ncu, b256 c512: "wait" the top stall).
        float s[2][4], s_odd[2][4];
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = s_odd[n][e] = 0.0f;
        if constexpr (FP8) {
            // Keys gid and gid + 8: this lane's HD / 4 bytes of each, a word per 16-dim slice
            // (bytes 0, 1 the B fragment's first register, 2, 3 its second).
            const unsigned char* k_lo = ks[gid] + tig * (HD / 4);
            const unsigned char* k_hi = ks[gid + 8] + tig * (HD / 4);
#pragma unroll
            for (int c = 0; c < HD / 64; c++) {
                const uint4 wl = *reinterpret_cast<const uint4*>(k_lo + c * 16);
                const uint4 wh = *reinterpret_cast<const uint4*>(k_hi + c * 16);
                const u32 lo[4] = {wl.x, wl.y, wl.z, wl.w}, hi[4] = {wh.x, wh.y, wh.z, wh.w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int kk = c * 4 + j;
                    u32 b[4];
                    e4m3x4_to_half2x2(lo[j], b[0], b[1]);
                    e4m3x4_to_half2x2(hi[j], b[2], b[3]);
                    float (*acc)[4] = kk % 2 == 0 ? s : s_odd;
                    mma_f16(acc[0], qf[kk], b[0], b[1]);
                    mma_f16(acc[1], qf[kk], b[2], b[3]);
                }
            }
        } else {
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                // Matrices: keys 0..7 then 8..15, each at dims kk*16 + 0..7 and + 8..15.
                u32 b[4];
                ldmatrix_x4(b, smem_addr(&ks[(mat >> 1) * 8 + mrow][kk * 16 + (mat & 1) * 8]));
                float (*acc)[4] = kk % 2 == 0 ? s : s_odd;
                mma_bf16(acc[0], qf[kk], b[0], b[1]);
                mma_bf16(acc[1], qf[kk], b[2], b[3]);
            }
        }
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] += s_odd[n][e];
        if (key0 + 16 > end) {
#pragma unroll
            for (int n = 0; n < 2; n++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (key0 + n * 8 + tig * 2 + (e & 1) >= end) s[n][e] = -INFINITY;
        }
        // Online softmax; a row's 16 scores are spread over the 4 lanes of a quad.
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (r == 1 && !upper_rows) continue;
            float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float new_max = fmaxf(row_max[r], mx * scale_log2);  // finite: key0 is visible
            const float correction = exp2f(row_max[r] - new_max);
            row_max[r] = new_max;
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < 2; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float p = exp2f(s[n][2 * r + e] * scale_log2 - new_max);
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
        if (!upper_rows) s[0][2] = s[0][3] = s[1][2] = s[1][3] = 0.0f;
        // The score accumulators are already P's A fragment layout (keys tig * 2 + {0, 1} and
        // tig * 2 + {8, 9} of the warp's 16).
        const u32 a[4] = {pack_attention<FP8>(s[0][0], s[0][1]), pack_attention<FP8>(s[0][2], s[0][3]),
                          pack_attention<FP8>(s[1][0], s[1][1]), pack_attention<FP8>(s[1][2], s[1][3])};
        if constexpr (FP8) {
            // Values of keys tig * 2, + 1, + 8 and + 9: this lane's HD / 8 bytes of each, which
            // are output column gid of every 8-dimension group: group j's column n is dimension
            // n * HD / 8 + j (undone where the output is written). A byte permute pairs two keys'
            // bytes of one dimension into the B fragment's order, then one conversion a pair.
            constexpr int WORDS = HD / 32;
            u32 va[WORDS], vb[WORDS], vc[WORDS], vd[WORDS];
            const int at = gid * (HD / 8);
            load_words(va, vs[tig * 2] + at);
            load_words(vb, vs[tig * 2 + 1] + at);
            load_words(vc, vs[tig * 2 + 8] + at);
            load_words(vd, vs[tig * 2 + 9] + at);
#pragma unroll
            for (int w = 0; w < WORDS; w++) {
                // Dimensions 4w .. 4w + 3 of this lane's share: groups 4w .. 4w + 3.
                u32 b0[4], b1[4];
                e4m3x4_to_half2x2(__byte_perm(va[w], vb[w], 0x5140), b0[0], b0[1]);
                e4m3x4_to_half2x2(__byte_perm(va[w], vb[w], 0x7362), b0[2], b0[3]);
                e4m3x4_to_half2x2(__byte_perm(vc[w], vd[w], 0x5140), b1[0], b1[1]);
                e4m3x4_to_half2x2(__byte_perm(vc[w], vd[w], 0x7362), b1[2], b1[3]);
#pragma unroll
                for (int g = 0; g < 4; g++) mma_f16(o[4 * w + g], a, b0[g], b1[g]);
            }
        } else {
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                // Transposed: keys 0..7 then 8..15, at dims dp*16 + 0..7 and + 8..15.
                u32 b[4];
                ldmatrix_x4_trans(b, smem_addr(&vs[(mat & 1) * 8 + mrow][dp * 16 + (mat >> 1) * 8]));
                mma_bf16(o[2 * dp], a, b[0], b[1]);
                mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
    }

    // Merge the warps' states through shared memory (the tiles are no longer needed).
    cp_async_wait<0>();
    __syncthreads();
    float* m_s = reinterpret_cast<float*>(dc_smem);  // [DC_WARPS][16]
    float* l_s = m_s + DC_WARPS * 16;                // [DC_WARPS][16]
    float* acc_s = l_s + DC_WARPS * 16;              // [DC_WARPS][16][HD]
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const int row = gid + r * 8;
        if (row >= group) continue;
        if (tig == 0) {
            m_s[warp * 16 + row] = row_max[r];
            l_s[warp * 16 + row] = sum;
        }
#pragma unroll
        for (int d = 0; d < HD / 8; d++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                // Column tig * 2 + e of group d: dimension d * 8 + column, or over an FP8
                // cache column * HD / 8 + d (the values' permutation above).
                const int col = tig * 2 + e, dim = FP8 ? col * (HD / 8) + d : d * 8 + col;
                acc_s[(warp * 16 + row) * HD + dim] = o[d][2 * r + e];
            }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += DC_THREADS) {
        const int g = i / HD, d = i % HD;
        float big = -INFINITY;
#pragma unroll
        for (int w = 0; w < DC_WARPS; w++) big = fmaxf(big, m_s[w * 16 + g]);
        float total = 0.0f, value = 0.0f;
#pragma unroll
        for (int w = 0; w < DC_WARPS; w++) {
            const float m = m_s[w * 16 + g];
            const float f = m == -INFINITY ? 0.0f : exp2f(m - big);
            total += l_s[w * 16 + g] * f;
            value += acc_s[(w * 16 + g) * HD + d] * f;
        }
        const int head = kv_head * group + g;
        if (num_splits == 1) {
            out[((u64)t * num_heads + head) * HD + d] = __float2bfloat16(total > 0.0f ? value / total : 0.0f);
        } else {
            const u64 at = ((u64)t * num_heads + head) * num_splits + split;
            part_out[at * HD + d] = value;
            if (d == 0) {
                part_max[at] = big;
                part_sum[at] = total;
            }
        }
    }
}

// Merges the split-K partials of one (row, KV head) per block (grid x, y; the row a token, or an
// index into `rows` when it is not null, as in the attention kernel), a warp per query head. The
// merge is on a decode step's critical path, so its loads go out together: each lane takes 32
// splits' maxima and sums at once, and the partial rows are read a few splits at a time, each
// split's weight handed round by a shuffle. (One thread per dimension looping over the splits
// waited out an L2 round trip per split. Doing this merge in the attention kernel's last block
// instead, counted in with an atomic, made the 8B bf16 batch-1 step 0.1 ms slower, H200; not
// established why, likely that block holding its multiprocessor from the next product's blocks.)
template <int HD>
__device__ void attention_reduce_impl(__nv_bfloat16* __restrict__ out, const float* __restrict__ part_out,
                                      const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                      const u32* __restrict__ rows, int num_splits, int num_heads, int num_kv_heads) {
    constexpr int PER_LANE = HD / 32;
    const u64 t = rows ? rows[blockIdx.x] : blockIdx.x;
    const int kv_head = blockIdx.y, group = num_heads / num_kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int g = warp; g < group; g += warps) {
        const u64 th = t * num_heads + kv_head * group + g;  // token * num_heads + head
        const float* maxima = part_max + th * num_splits;
        const float* sums = part_sum + th * num_splits;
        const float* rows_out = part_out + th * num_splits * HD + lane * PER_LANE;
        float big = -INFINITY;
        for (int s = lane; s < num_splits; s += 32) big = fmaxf(big, maxima[s]);
        big = warp_max(big);
        float total = 0.0f, value[PER_LANE];
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) value[j] = 0.0f;
        for (int base = 0; base < num_splits; base += 32) {
            const int mine = base + lane, count = min(32, num_splits - base);
            const float mx = mine < num_splits ? maxima[mine] : -INFINITY;
            const float f = mx == -INFINITY ? 0.0f : exp2f(mx - big);
            if (mine < num_splits) total += sums[mine] * f;
#pragma unroll 4
            for (int i = 0; i < count; i++) {
                const float fi = __shfl_sync(0xffffffffu, f, i);
                // A split past the context (a graph is planned for its bucket's longest context,
                // so most of its splits are empty at shorter ones) has no row to read: skipping
                // it is the whole warp's branch.
                if (fi == 0.0f) continue;
                const float* src = rows_out + (u64)(base + i) * HD;
#pragma unroll
                for (int j = 0; j < PER_LANE; j += 2) {
                    const float2 v = *reinterpret_cast<const float2*>(src + j);
                    value[j] += v.x * fi;
                    value[j + 1] += v.y * fi;
                }
            }
        }
        total = warp_sum(total);
#pragma unroll
        for (int j = 0; j < PER_LANE; j++)
            out[th * HD + lane * PER_LANE + j] = __float2bfloat16(total > 0.0f ? value[j] / total : 0.0f);
    }
}

#define REDUCE_PARAMS                                                                                      \
    __nv_bfloat16 *out, const float *part_out, const float *part_max, const float *part_sum, const u32 *rows, \
        int num_splits, int num_heads, int num_kv_heads
#define DECODE_KERNEL(HD, STAGES)                                                                          \
    extern "C" __global__ void __launch_bounds__(DC_THREADS)                                              \
        paged_attention_hd##HD(ATTENTION_PARAMS(__nv_bfloat16)) {                                          \
        prefetch_l2_share(l2_prefetch, l2_prefetch_bytes);                                                 \
        paged_decode_impl<HD, STAGES, false>(ATTENTION_ARGS); /* its own programmatic-dependent wait */    \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(DC_THREADS) attention_reduce_hd##HD(REDUCE_PARAMS) {     \
        PDL_ENTER();                                                                                       \
        attention_reduce_impl<HD>(out, part_out, part_max, part_sum, rows, num_splits, num_heads, num_kv_heads); \
    }
// Over an FP8 cache (E4M3 bytes; sm_89 on). Twice the stages of the bf16 kernel's in about the
// same shared memory, since a tile is half the bytes: as many blocks a multiprocessor, and the
// same bytes in flight.
#define DECODE_FP8_KERNEL(HD, STAGES)                                                                      \
    extern "C" __global__ void __launch_bounds__(DC_THREADS)                                              \
        paged_attention_fp8_hd##HD(ATTENTION_PARAMS(unsigned char)) {                                      \
        prefetch_l2_share(l2_prefetch, l2_prefetch_bytes);                                                 \
        paged_decode_impl<HD, STAGES, true>(ATTENTION_ARGS); /* its own programmatic-dependent wait */     \
    }
DECODE_KERNEL(64, 4)
DECODE_KERNEL(128, 2)
DECODE_KERNEL(256, 2)
DECODE_FP8_KERNEL(64, 8)
DECODE_FP8_KERNEL(128, 4)
DECODE_FP8_KERNEL(256, 4)
