// Sparse mixture-of-experts on the device, in four launches that never synchronise with the host
// (so a decode step with experts still captures in a CUDA graph):
//
//  1. `moe_route`: per token, softmax over the router logits, its top-k experts (the larger
//     probability first, the lower index on a tie, as the CPU path sorts) and their weights,
//     renormalised over the k when `norm_topk`. Assignment a = t * k + j is token t's j-th choice.
//  2. `moe_group`: one block counts the assignments per expert, lays the experts out back to back
//     (`offsets`), lists each expert's assignments there (`sorted`) and cuts every expert's run
//     into tiles of at most MOE_BM assignments (`tiles`: expert, first, end; `num_tiles`).
//  3. `moe_gemm` (twice): the grouped product. Block (x, y) takes tile y and output columns
//     x * MOE_BN ..: out[a] = in[a / in_div] · W_eᵀ for the tile's assignments a, W_e the expert's
//     [n, k] slice of the stacked weight. Tiles past `num_tiles` (the grid is sized for the worst
//     case) return at once. gate_up reads token rows (in_div = k), down reads assignment rows.
//     Tensor cores (mma.sync m16n8k16, bf16 in, float32 accumulate), 4 warps of 16 rows each.
//  4. `moe_combine`: out[t] = Σ_j weight[t, j] · y[t * k + j], in float32, rounded once to bf16.
//
// The order of assignments within an expert's run depends on atomics, but each output row is
// computed on its own, so results do not.

#define MOE_BM 64
#define MOE_BN 64
#define MOE_BK 32
#define MOE_THREADS 128
#define MOE_MAX_EXPERTS 1024
#define MOE_MAX_TOP_K 32

// One warp per token; `experts` at most MOE_MAX_EXPERTS, k at most MOE_MAX_TOP_K.
extern "C" __global__ void moe_route(const float* __restrict__ logits, u32* __restrict__ ids,
                                     float* __restrict__ weights, int num_tokens, int experts, int k,
                                     int norm_topk) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= num_tokens) return;
    const float* row = logits + (u64)t * experts;
    float max = -INFINITY;
    for (int e = lane; e < experts; e += 32) max = fmaxf(max, row[e]);
    max = warp_max(max);
    float total = 0.0f;
    for (int e = lane; e < experts; e += 32) total += __expf(row[e] - max);
    total = warp_sum(total);
    // k rounds of an arg-max over the experts not yet taken (taken: bit set in `taken`).
    u32 taken[MOE_MAX_EXPERTS / 32];
    for (int i = 0; i < MOE_MAX_EXPERTS / 32; i++) taken[i] = 0;
    float chosen_sum = 0.0f, chosen_p[MOE_MAX_TOP_K];
    u32 chosen_e[MOE_MAX_TOP_K];
    for (int j = 0; j < k; j++) {
        float best = -INFINITY;
        int best_e = experts;
        for (int e = lane; e < experts; e += 32) {
            if ((taken[e >> 5] >> (e & 31)) & 1u) continue;
            const float v = row[e];
            if (v > best || (v == best && e < best_e)) best = v, best_e = e;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float v = __shfl_xor_sync(0xffffffff, best, offset);
            const int e = __shfl_xor_sync(0xffffffff, best_e, offset);
            if (v > best || (v == best && e < best_e)) best = v, best_e = e;
        }
        taken[best_e >> 5] |= 1u << (best_e & 31);
        const float p = __expf(best - max) / total;
        chosen_p[j] = p;
        chosen_e[j] = best_e;
        chosen_sum += p;
    }
    if (lane == 0)
        for (int j = 0; j < k; j++) {
            ids[(u64)t * k + j] = chosen_e[j];
            weights[(u64)t * k + j] = norm_topk ? chosen_p[j] / chosen_sum : chosen_p[j];
        }
}

// One block of 1024 threads. `offsets` gets experts + 2 words: the run starts, the total, then
// the tile count; `tiles` 3 words per tile.
extern "C" __global__ void moe_group(const u32* __restrict__ ids, int assignments, int experts,
                                     u32* __restrict__ offsets, u32* __restrict__ sorted, u32* __restrict__ tiles) {
    PDL_ENTER();
    __shared__ u32 count[MOE_MAX_EXPERTS], cursor[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int a = threadIdx.x; a < assignments; a += blockDim.x) atomicAdd(&count[ids[a]], 1u);
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 at = 0, num_tiles = 0;
        for (int e = 0; e < experts; e++) {
            offsets[e] = at;
            cursor[e] = at;
            for (u32 first = at; first < at + count[e]; first += MOE_BM) {
                tiles[3 * num_tiles] = e;
                tiles[3 * num_tiles + 1] = first;
                tiles[3 * num_tiles + 2] = min(first + MOE_BM, at + count[e]);
                num_tiles++;
            }
            at += count[e];
        }
        offsets[experts] = at;
        offsets[experts + 1] = num_tiles;
    }
    __syncthreads();
    for (int a = threadIdx.x; a < assignments; a += blockDim.x) sorted[atomicAdd(&cursor[ids[a]], 1u)] = a;
}

// k a multiple of 8; `w` holds the experts' [n, k] matrices back to back.
extern "C" __global__ void __launch_bounds__(MOE_THREADS)
    moe_gemm(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ in, const __nv_bfloat16* __restrict__ w,
             const u32* __restrict__ sorted, const u32* __restrict__ tiles, const u32* __restrict__ num_tiles,
             int in_div, int n, int k) {
    PDL_ENTER();
    if (blockIdx.y >= *num_tiles) return;
    constexpr int PAD = 8, STRIDE = MOE_BK + PAD;
    __shared__ __align__(16) __nv_bfloat16 a_s[MOE_BM][STRIDE];
    __shared__ __align__(16) __nv_bfloat16 b_s[MOE_BN][STRIDE];
    __shared__ u32 rows[MOE_BM];
    const u32 expert = tiles[3 * blockIdx.y], first = tiles[3 * blockIdx.y + 1], end = tiles[3 * blockIdx.y + 2];
    const int count = end - first, n0 = blockIdx.x * MOE_BN;
    const __nv_bfloat16* we = w + (u64)expert * n * k;
    for (int r = threadIdx.x; r < MOE_BM; r += MOE_THREADS) rows[r] = r < count ? sorted[first + r] : 0;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int mat = lane >> 3, mrow = lane & 7;
    float acc[MOE_BN / 8][4];
#pragma unroll
    for (int j = 0; j < MOE_BN / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    // Each thread copies 2 chunks of 16 bytes of A and 2 of B per K step (64 rows x 4 chunks).
    for (int k0 = 0; k0 < k; k0 += MOE_BK) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int chunk = threadIdx.x + i * MOE_THREADS, r = chunk >> 2, c = (chunk & 3) * 8;
            const bool a_valid = r < count && k0 + c < k;
            const __nv_bfloat16* a_src = a_valid ? in + (u64)(rows[r] / in_div) * k + k0 + c : in;
            cp_async_16(smem_addr(&a_s[r][c]), a_src, a_valid);
            const bool b_valid = n0 + r < n && k0 + c < k;
            const __nv_bfloat16* b_src = b_valid ? we + (u64)(n0 + r) * k + k0 + c : w;
            cp_async_16(smem_addr(&b_s[r][c]), b_src, b_valid);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MOE_BK / 16; kk++) {
            u32 af[4];
            ldmatrix_x4(af, smem_addr(&a_s[warp * 16 + (mat & 1) * 8 + mrow][kk * 16 + (mat >> 1) * 8]));
#pragma unroll
            for (int np = 0; np < MOE_BN / 16; np++) {
                u32 b[4];
                ldmatrix_x4(b, smem_addr(&b_s[np * 16 + (mat >> 1) * 8 + mrow][kk * 16 + (mat & 1) * 8]));
                mma_bf16(acc[2 * np], af, b[0], b[1]);
                mma_bf16(acc[2 * np + 1], af, b[2], b[3]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < MOE_BN / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = warp * 16 + gid + (e >> 1) * 8, col = n0 + j * 8 + tig * 2 + (e & 1);
            if (r < count && col < n) out[(u64)rows[r] * n + col] = __float2bfloat16(acc[j][e]);
        }
}

// One block per token.
extern "C" __global__ void moe_combine(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ y,
                                       const float* __restrict__ weights, int k, int hidden) {
    PDL_ENTER();
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += weights[(u64)t * k + j] * __bfloat162float(y[((u64)t * k + j) * hidden + i]);
        out[(u64)t * hidden + i] = __float2bfloat16(sum);
    }
}
