// Paged attention: every query token attends, causally, to positions 0..=pos of its own sequence,
// reading keys and values through the sequence's block table. One thread block per (token, KV
// head, split): the block's warps share the `group` query heads of that KV head (grouped-query
// attention, each key and value read once per group), and take 32 keys at a time, one per lane,
// with an online softmax. Long contexts are cut into `num_splits` partitions processed by
// separate blocks (split-K, "flash decoding"), whose partial results `attention_reduce` merges.
// In a batch that mixes prefill chunks and decode tokens, the chunks go to `prefill_attention.cu`
// and this kernel takes only the decode tokens: block x handles token `rows[x]`; with `rows` null
// (decode-only batches, CUDA graphs) block x handles token x, as before.
//
// Layouts: q rows of `q_stride` elements holding [num_heads, HD] bf16 (the Q part of the QKV
// projection's output); out [tokens, num_heads, HD] bf16; caches [num_blocks, num_kv_heads, block_size, HD]
// bf16; block_tables [num_seqs, max_blocks] u32; partials (split-K only) float
// [tokens, num_heads, num_splits, HD] plus max and sum [tokens, num_heads, num_splits].

// MAX_GROUP (a template parameter) bounds the query heads per KV head held in registers: the
// smallest power of two >= the model's group, so small groups do not pay for large ones.
#define WARPS 8

template <int HD, int MAX_GROUP>
__device__ void paged_attention_impl(
    __nv_bfloat16* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max,
    float* __restrict__ part_sum, const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const u32* __restrict__ block_tables, const u32* __restrict__ token_seq,
    const u32* __restrict__ positions, const u32* __restrict__ rows, int q_stride, int max_blocks, int num_heads,
    int num_kv_heads, int block_size, float scale, int partition) {
    constexpr int DPL = HD / 32;  // dimensions per lane
    const int t = rows ? rows[blockIdx.x] : blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
    const int group = num_heads / num_kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int context = positions[t] + 1;
    const int begin = split * partition;
    const int end = min(context, begin + partition);
    const u32* table = block_tables + (u64)token_seq[t] * max_blocks;

    __shared__ float q_s[MAX_GROUP][HD];
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        q_s[g][d] = __bfloat162float(q[(u64)t * q_stride + (kv_head * group + g) * HD + d]) * scale;
    }
    __syncthreads();

    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][DPL];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < DPL; j++) acc[g][j] = 0.0f;
    }

    for (int base = begin + warp * 32; base < end; base += WARPS * 32) {
        const int p = base + lane;
        const bool valid = p < end;
        float s[MAX_GROUP];
        if (valid) {
            const u64 slot_block = table[p / block_size];
            const __nv_bfloat16* key =
                k_cache + ((slot_block * num_kv_heads + kv_head) * block_size + p % block_size) * HD;
            // Head dim 64 (a 128-byte key): every load of the key first, then the arithmetic, so
            // the whole key is in flight at once (SmolLM2 at batch 1: 32 -> 22 us per layer).
            // Head dim 128 takes its own path below: the same change held its 256 bytes in
            // registers (62 -> 119 registers, 8B layout 1520 -> 1189 GB/s on the H100). The
            // dot-product loops are written out on purpose: sharing them through an inline helper
            // changed the generated code and cost the 8B layout 1532 -> 1125 GB/s.
            if constexpr (HD <= 64) {
                uint4 raw[HD / 8];
#pragma unroll
                for (int i = 0; i < HD / 8; i++) raw[i] = *reinterpret_cast<const uint4*>(key + i * 8);
#pragma unroll
                for (int g = 0; g < MAX_GROUP; g++) s[g] = 0.0f;
#pragma unroll
                for (int i = 0; i < HD / 8; i++) {
                    const int d0 = i * 8;
                    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[i]);
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float2 kv = __bfloat1622float2(pairs[e]);
#pragma unroll
                        for (int g = 0; g < MAX_GROUP; g++)
                            if (g < group) s[g] += q_s[g][d0 + 2 * e] * kv.x + q_s[g][d0 + 2 * e + 1] * kv.y;
                    }
                }
            }
        } else {
#pragma unroll
            for (int g = 0; g < MAX_GROUP; g++) s[g] = -INFINITY;
        }
        if constexpr (HD > 64) {
            // Head dim 128: two lanes per key, 16 keys per pass; a lane pair reads adjacent
            // 16-byte chunks, so every load instruction uses whole 32-byte sectors (one lane per
            // key used half of each sector per load). With registers bounded for 4 blocks per SM
            // (the kernel's `__launch_bounds__`) the 8B layout went 1590 -> 1710 GB/s.
            const int half = lane & 1;
#pragma unroll
            for (int pass = 0; pass < 2; pass++) {
                const int kp = base + pass * 16 + (lane >> 1);
                float part[MAX_GROUP];
#pragma unroll
                for (int g = 0; g < MAX_GROUP; g++) part[g] = 0.0f;
                if (kp < end) {
                    const u64 slot_block = table[kp / block_size];
                    const __nv_bfloat16* key =
                        k_cache + ((slot_block * num_kv_heads + kv_head) * block_size + kp % block_size) * HD;
#pragma unroll
                    for (int i = 0; i < HD / 16; i++) {
                        const int d0 = (2 * i + half) * 8;
                        const uint4 raw = *reinterpret_cast<const uint4*>(key + d0);
                        const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const float2 kv = __bfloat1622float2(pairs[e]);
#pragma unroll
                            for (int g = 0; g < MAX_GROUP; g++)
                                if (g < group) part[g] += q_s[g][d0 + 2 * e] * kv.x + q_s[g][d0 + 2 * e + 1] * kv.y;
                        }
                    }
                }
                // Lane j's key is j: pass j / 16, read by the pair starting at lane (j % 16) * 2.
#pragma unroll
                for (int g = 0; g < MAX_GROUP; g++) {
                    if (g >= group) continue;
                    part[g] += __shfl_xor_sync(0xffffffff, part[g], 1);
                    const float score = __shfl_sync(0xffffffff, part[g], (lane & 15) * 2);
                    if ((lane >> 4) == pass && valid) s[g] = score;
                }
            }
        }
        float p_lane[MAX_GROUP];
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g >= group) continue;
            const float chunk_max = warp_max(s[g]);
            const float new_m = fmaxf(m[g], chunk_max);
            const float correction = __expf(m[g] - new_m);
            p_lane[g] = valid ? __expf(s[g] - new_m) : 0.0f;
            l[g] = l[g] * correction + warp_sum(p_lane[g]);
#pragma unroll
            for (int j = 0; j < DPL; j++) acc[g][j] *= correction;
            m[g] = new_m;
        }
        // Values: lane owns dimensions lane * DPL ..; key j's weight comes from lane j. Batches of
        // V_BATCH keys, each batch's loads all issued before its arithmetic (a loop that loaded
        // and used one value at a time kept too few loads in flight). Head dim 128 takes batches
        // of 8: its values are twice as wide, and registers decide its occupancy.
        constexpr int V_BATCH = HD <= 64 ? 16 : 8;
        const int keys = min(32, end - base);
#pragma unroll
        for (int j0 = 0; j0 < 32; j0 += V_BATCH) {
            __nv_bfloat162 vr[V_BATCH][DPL / 2];
#pragma unroll
            for (int jj = 0; jj < V_BATCH; jj++) {
                const int j = j0 + jj;
                if (j < keys) {
                    const int pj = base + j;
                    const u64 slot_block = table[pj / block_size];
                    const __nv_bfloat16* value =
                        v_cache + ((slot_block * num_kv_heads + kv_head) * block_size + pj % block_size) * HD + lane * DPL;
#pragma unroll
                    for (int e = 0; e < DPL / 2; e++) vr[jj][e] = reinterpret_cast<const __nv_bfloat162*>(value)[e];
                } else {
#pragma unroll
                    for (int e = 0; e < DPL / 2; e++) vr[jj][e] = __floats2bfloat162_rn(0.0f, 0.0f);
                }
            }
#pragma unroll
            for (int jj = 0; jj < V_BATCH; jj++) {
#pragma unroll
                for (int g = 0; g < MAX_GROUP; g++) {
                    if (g >= group) continue;
                    // Lanes past `keys` hold weight 0 (invalid keys), so padding adds nothing.
                    const float w = __shfl_sync(0xffffffff, p_lane[g], j0 + jj);
#pragma unroll
                    for (int e = 0; e < DPL / 2; e++) {
                        const float2 v = __bfloat1622float2(vr[jj][e]);
                        acc[g][2 * e] += w * v.x;
                        acc[g][2 * e + 1] += w * v.y;
                    }
                }
            }
        }
    }

    // Merge the warps' partial softmax states.
    __shared__ float m_s[WARPS][MAX_GROUP], l_s[WARPS][MAX_GROUP];
    __shared__ float acc_s[WARPS][MAX_GROUP][HD];
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            m_s[warp][g] = m[g];
            l_s[warp][g] = l[g];
        }
    }
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++)
        if (g < group)
#pragma unroll
            for (int e = 0; e < DPL; e++) acc_s[warp][g][lane * DPL + e] = acc[g][e];
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        float big = -INFINITY;
        for (int w = 0; w < WARPS; w++) big = fmaxf(big, m_s[w][g]);
        float total = 0.0f, value = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            const float f = m_s[w][g] == -INFINITY ? 0.0f : __expf(m_s[w][g] - big);
            total += l_s[w][g] * f;
            value += acc_s[w][g][d] * f;
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

#define ATTENTION_PARAMS                                                                                   \
    __nv_bfloat16 *out, float *part_out, float *part_max, float *part_sum, const __nv_bfloat16 *q,         \
        const __nv_bfloat16 *k_cache, const __nv_bfloat16 *v_cache, const u32 *block_tables,               \
        const u32 *token_seq, const u32 *positions, const u32 *rows, int q_stride, int max_blocks,         \
        int num_heads, int num_kv_heads, int block_size, float scale, int partition
#define ATTENTION_ARGS                                                                                     \
    out, part_out, part_max, part_sum, q, k_cache, v_cache, block_tables, token_seq, positions, rows,      \
        q_stride, max_blocks, num_heads, num_kv_heads, block_size, scale, partition
#define ATTENTION_KERNEL(HD, G)                                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, HD == 128 ? 4 : 1) paged_attention_hd##HD##_g##G(ATTENTION_PARAMS) { \
        paged_attention_impl<HD, G>(ATTENTION_ARGS);                                                       \
    }
ATTENTION_KERNEL(64, 1)
ATTENTION_KERNEL(64, 2)
ATTENTION_KERNEL(64, 4)
ATTENTION_KERNEL(64, 8)
ATTENTION_KERNEL(128, 1)
ATTENTION_KERNEL(128, 2)
ATTENTION_KERNEL(128, 4)
ATTENTION_KERNEL(128, 8)

// Merges split-K partials: one block per (row, head) (grid x, y), one thread per dimension; the
// row is a token, or an index into `rows` when it is not null (as in the attention kernel).
extern "C" __global__ void attention_reduce(__nv_bfloat16* __restrict__ out, const float* __restrict__ part_out,
                                            const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                            const u32* __restrict__ rows, int num_splits, int head_dim) {
    const u64 t = rows ? rows[blockIdx.x] : blockIdx.x;
    const u64 th = t * gridDim.y + blockIdx.y;  // token * num_heads + head
    float big = -INFINITY;
    for (int s = 0; s < num_splits; s++) big = fmaxf(big, part_max[th * num_splits + s]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float total = 0.0f, value = 0.0f;
        for (int s = 0; s < num_splits; s++) {
            const float mx = part_max[th * num_splits + s];
            const float f = mx == -INFINITY ? 0.0f : __expf(mx - big);
            total += part_sum[th * num_splits + s] * f;
            value += part_out[(th * num_splits + s) * head_dim + d] * f;
        }
        out[th * head_dim + d] = __float2bfloat16(total > 0.0f ? value / total : 0.0f);
    }
}
