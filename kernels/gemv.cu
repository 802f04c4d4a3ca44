// Small-M linear layers: y[m, n] = x[m, :] · W[n, :] (+ bias[n]) for m < M ≤ 8, bf16 weights and
// activations, float32 accumulation, bf16 or float32 out. At M ≤ 8 a linear layer is a pure
// weight stream (N·K·2 bytes against M·K·2 of input), so the kernel is built to read W once at
// full bandwidth, for all M rows together:
//
//  * one block of up to GEMV_WARPS warps per multiprocessor (`launch::gemv_grid`), each warp
//    streaming whole output rows (grid-stride over rows; two at a time in FP8), cut into chunks
//    of 32·U 16-byte vectors (8 bf16 each), lane-consecutive, so a warp reads 512 contiguous
//    bytes per copy instruction;
//  * the chunks go through a per-warp ring of S stages in shared memory, filled with cp.async:
//    each lane copies its own vectors of a chunk and later reads back only those, so a warp keeps
//    S - 1 chunks in flight while it computes on one, across row boundaries, without holding them
//    in registers. A decode-sized product is bound by the bytes each multiprocessor has in flight:
//    with S = 6 stages of 2 KB a warp (160 KB a multiprocessor in flight) the Llama-3.1-8B products
//    at one row ran 1.06-1.13x faster than with one 8 KB chunk a warp in registers (loaded, then
//    used, then the next), the head as fast, and the whole decode step 6-7% faster. Two 4 KB
//    register buffers a warp and 4 stages of 4 KB (12 warps fit) fell in between; 12 stages of
//    1 KB (more instructions a byte), blocks of 8 warps and of 18 were slower than either (H200,
//    BENCHMARKS.md, session 18);
//  * the M input rows are staged once per block in shared memory as bf16 ([MP][K]), so every
//    weight vector is multiplied by every row from registers and shared memory; the M partial
//    sums are reduced with warp shuffles and lane 0 writes them. Few, large blocks keep the
//    staging cheap: it is repeated per block, and at the 8B shape's down projection (K = 14336)
//    a block's input is 28 KB per row read from L2, which a grid of thousands of small blocks
//    would pay thousands of times. The host fits as many warps as the ring leaves room for
//    (`launch::gemv_block_fit`).
//
// Bytes: N·K·2 of weights from DRAM (read once), M·K·2 (plain) of input per block from L2,
// M·N·(2|4) out. The Llama-3.1-8B products at M = 1 are 33 MB (o_proj) to 1.05 GB (lm_head);
// SmolLM2-135M's are 0.66 to 57 MB, latency-bound except the head.
//
// The staging step is where neighbouring element-wise kernels fold in (the `MODE`), computed by
// the whole block with 16-byte loads:
//  * GEMV_PLAIN: x is a bf16 [M, K] matrix (K a multiple of 8, 16-byte aligned);
//  * GEMV_SILU:  x is the gate_up buffer [M, 2K]; the block computes act = silu(gate) · up
//    with `silu_and_mul`'s formula and rounding (bf16), so the separate kernel is skipped;
//  * GEMV_NORM:  x is the float32 residual [*, K]; the block computes r = x + delta (delta bf16,
//    optional) and rmsnorm(r) · norm_w with `fused_add_rmsnorm`'s formula and rounding (bf16; the
//    sum of squares is reduced in another order, so the last bit can differ).
//    Row m reads residual row rows[m] when `rows` is given (the final norm of the wanted rows).
//    Block 0 alone writes r to `residual_out` (optional), which must be a different buffer from
//    x: every block reads x, so nobody may write it during the launch (the caller ping-pongs
//    two residual buffers; see `run_layers`).
//  * GEMV_MERGE: x is the decode attention's split-K partial rows (float32), `norm_w` their
//    maxima and `residual_out` their sums (read only), `splits` and `head_dim` their shape: the
//    block merges them (`merge_splits8`, rounded to bf16 as `attention_reduce` writes them), so
//    that kernel is skipped. One row only (MP = 1): a single stream's step, where the merge's own
//    launch and dependent loads are exposed.
// Rows m ≥ M of the padded tile (MP is M rounded up to 1, 2, 4, 8) are zeros and never stored.
//
// Weights are bf16, or E4M3 with a float32 scale per row (`FP8`, `fp8.cu`'s format; sm_89 on):
// a 16-byte vector then holds 16 weights, so an FP8 row streams half the bytes, each lane's
// partial sums are of the stored values, and the row's scale multiplies the reduced sum
// (K a multiple of 16). An FP8 warp streams two rows at once (`GemvRows`), half a chunk each:
// each input element is read from shared memory and converted once for both rows.
//
// Under a programmatic dependent launch (`pdl_wait` in common.cuh) each warp issues the copies of
// its first S - 1 chunks before waiting for the kernel that produces x; everything else follows
// the wait.

// GEMV_PLAIN, GEMV_SILU, GEMV_NORM and GEMV_WARPS are in common.cuh (the ggml GEMV shares them).

// The ring: stages a warp, and 16-byte vectors a lane in each (`launch::GEMV_RING_BYTES_PER_WARP`
// on the host: 6 · 4 · 32 · 16 bytes).
#define GEMV_STAGES 6
#define GEMV_STAGE_VECTORS 4

template <bool FP8>
struct GemvRows {
    static constexpr int value = FP8 ? 2 : 1;
};

// Stages the M input rows of `x` in shared memory `xs` ([MP][k] bf16) as MODE says, with the whole
// block (see the top of this file); the caller synchronizes after.
template <int MODE, int MP>
__device__ __forceinline__ void gemv_stage(__nv_bfloat16* xs, const void* __restrict__ x, const __nv_bfloat16* __restrict__ delta,
                                           const float* __restrict__ norm_w, float* __restrict__ residual_out,
                                           const u32* __restrict__ rows, int m, int k, float eps, float* scratch, int splits,
                                           int head_dim) {
    const int xvecs = k >> 3;
    uint4* xs_vec = reinterpret_cast<uint4*>(xs);
    if (MODE == GEMV_MERGE) {
        for (int i = threadIdx.x; i < MP * xvecs; i += blockDim.x) {
            const int r = i / xvecs, v = i - r * xvecs;
            float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (r < m) merge_splits8(reinterpret_cast<const float*>(x), norm_w, residual_out, r, v, k, splits, head_dim, f);
            xs_vec[i] = float8_to_bf16x8(f);
        }
    } else if (MODE == GEMV_PLAIN) {
        const uint4* src = reinterpret_cast<const uint4*>(x);
        for (int i = threadIdx.x; i < MP * xvecs; i += blockDim.x) xs_vec[i] = i < m * xvecs ? src[i] : make_uint4(0, 0, 0, 0);
    } else if (MODE == GEMV_SILU) {
        const uint4* gate_up = reinterpret_cast<const uint4*>(x);  // row r: gate vectors [0, xvecs), up [xvecs, 2 xvecs)
        for (int i = threadIdx.x; i < MP * xvecs; i += blockDim.x) {
            const int r = i / xvecs, v = i - r * xvecs;
            if (r >= m) {
                xs_vec[i] = make_uint4(0, 0, 0, 0);
                continue;
            }
            float g[8], u[8], a[8];
            bf16x8_to_float(gate_up[(u64)r * 2 * xvecs + v], g);
            bf16x8_to_float(gate_up[(u64)r * 2 * xvecs + xvecs + v], u);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = g[e] / (1.0f + __expf(-g[e])) * u[e];
            xs_vec[i] = float8_to_bf16x8(a);
        }
    } else {
        // One row at a time, the whole block: the sum of squares (a block reduction), then the
        // normalized row. Four floats per step; K is a multiple of 8.
        const float* residual = reinterpret_cast<const float*>(x);
        const bool keep = residual_out != nullptr && blockIdx.x == 0;
        const int quads = k >> 2;
        for (int r = 0; r < MP; ++r) {
            __nv_bfloat16* dst = xs + r * k;
            if (r >= m) {
                for (int c = threadIdx.x; c < k; c += blockDim.x) dst[c] = __float2bfloat16(0.0f);
                continue;
            }
            const u64 src = rows != nullptr ? (u64)rows[r] : (u64)r;
            const float4* xr = reinterpret_cast<const float4*>(residual + src * k);
            const __nv_bfloat162* dr = delta != nullptr ? reinterpret_cast<const __nv_bfloat162*>(delta + src * k) : nullptr;
            float sum_sq = 0.0f;
            for (int q = threadIdx.x; q < quads; q += blockDim.x) {
                float4 v = xr[q];
                if (dr != nullptr) {
                    const float2 d0 = __bfloat1622float2(dr[2 * q]), d1 = __bfloat1622float2(dr[2 * q + 1]);
                    v.x += d0.x, v.y += d0.y, v.z += d1.x, v.w += d1.y;
                }
                sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            const float inv = rsqrtf(block_sum(sum_sq, scratch) / k + eps);
            for (int q = threadIdx.x; q < quads; q += blockDim.x) {
                float4 v = xr[q];
                if (dr != nullptr) {
                    const float2 d0 = __bfloat1622float2(dr[2 * q]), d1 = __bfloat1622float2(dr[2 * q + 1]);
                    v.x += d0.x, v.y += d0.y, v.z += d1.x, v.w += d1.y;
                }
                if (keep) reinterpret_cast<float4*>(residual_out + src * k)[q] = v;
                const float4 nw = reinterpret_cast<const float4*>(norm_w)[q];
                __nv_bfloat162* d2 = reinterpret_cast<__nv_bfloat162*>(dst + 4 * q);
                d2[0] = __floats2bfloat162_rn(nw.x * (v.x * inv), nw.y * (v.y * inv));
                d2[1] = __floats2bfloat162_rn(nw.z * (v.z * inv), nw.w * (v.w * inv));
            }
        }
    }
}

// The product (see the top of this file): stage the input, stream the weight rows through the
// ring.
template <int MODE, int MP, bool FP8, int S, int U>
__device__ __forceinline__ void gemv_body(void* __restrict__ out, int out_f32, const void* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ delta, const float* __restrict__ norm_w,
                                          float* __restrict__ residual_out, const u32* __restrict__ rows,
                                          const float* __restrict__ bias, const void* __restrict__ w_raw,
                                          const float* __restrict__ w_scale, int m, int n, int k, float eps, int splits,
                                          int head_dim) {
    constexpr int RPW = GemvRows<FP8>::value;
    constexpr int UR = U / RPW;  // vectors per lane and row in one stage
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    __shared__ float scratch[32];
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(gemv_smem);  // [MP][k]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int xvecs = k >> 3;
    const int vecs = FP8 ? k >> 4 : xvecs;
    // This warp's ring: [S][U][32] vectors after the staged input.
    uint4* ring = reinterpret_cast<uint4*>(gemv_smem + (u64)MP * k * 2) + (u64)warp * S * U * 32;
    const unsigned char* w = reinterpret_cast<const unsigned char*>(w_raw);
    const u64 row_bytes = FP8 ? (u64)k : (u64)k * 2;
    const int warps = blockDim.x >> 5;
    const int first_row = (blockIdx.x * warps + warp) * RPW;
    const int stride = gridDim.x * warps * RPW;
    const int groups = first_row < n ? (n - first_row + stride - 1) / stride : 0;
    const int chunk_vecs = 32 * UR;
    const int chunks = (vecs + chunk_vecs - 1) / chunk_vecs;
    const int items = groups * chunks;  // warp-uniform

    auto issue = [&](int item) {
        if (item < items) {
            const int g = item / chunks, c = item - g * chunks;
            const int row0 = first_row + g * stride;
            uint4* stage = ring + (item % S) * U * 32;
#pragma unroll
            for (int q = 0; q < RPW; ++q) {
                const uint4* wrow = reinterpret_cast<const uint4*>(w + (u64)(row0 + q) * row_bytes);
#pragma unroll
                for (int j = 0; j < UR; ++j) {
                    const int v = c * chunk_vecs + j * 32 + lane;
                    const bool valid = row0 + q < n && v < vecs;
                    cp_async_16(smem_addr(stage + (q * UR + j) * 32 + lane), valid ? wrow + v : reinterpret_cast<const uint4*>(w), valid);
                }
            }
        }
        cp_async_commit();  // empty groups too: the wait below counts one group an item
    };
#pragma unroll
    for (int i = 0; i < S - 1; ++i) issue(i);
    pdl_wait();
    pdl_trigger();

    gemv_stage<MODE, MP>(xs, x, delta, norm_w, residual_out, rows, m, k, eps, scratch, splits, head_dim);
    __syncthreads();

    const uint4* xv = reinterpret_cast<const uint4*>(xs);
    float acc[RPW][MP];
#pragma unroll
    for (int q = 0; q < RPW; ++q)
#pragma unroll
        for (int r = 0; r < MP; ++r) acc[q][r] = 0.0f;
    for (int i = 0; i < items; ++i) {
        cp_async_wait<S - 2>();  // item i has landed (this lane's vectors of it)
        issue(i + S - 1);        // into the stage item i - 1 used
        const int g = i / chunks, c = i - g * chunks;
        const uint4* stage = ring + (i % S) * U * 32;
#pragma unroll
        for (int j = 0; j < UR; ++j) {
            const int v = c * chunk_vecs + j * 32 + lane;
            if (v < vecs) {
                if constexpr (FP8) {
                    float wf[RPW][16];
#pragma unroll
                    for (int q = 0; q < RPW; ++q) {
                        const uint4 wq = stage[(q * UR + j) * 32 + lane];
                        e4m3x4_to_float(wq.x, wf[q]);
                        e4m3x4_to_float(wq.y, wf[q] + 4);
                        e4m3x4_to_float(wq.z, wf[q] + 8);
                        e4m3x4_to_float(wq.w, wf[q] + 12);
                    }
#pragma unroll
                    for (int r = 0; r < MP; ++r) {
                        float xf[16];
                        bf16x8_to_float(xv[r * xvecs + 2 * v], xf);
                        bf16x8_to_float(xv[r * xvecs + 2 * v + 1], xf + 8);
#pragma unroll
                        for (int q = 0; q < RPW; ++q)
#pragma unroll
                            for (int e = 0; e < 16; ++e) acc[q][r] = fmaf(wf[q][e], xf[e], acc[q][r]);
                    }
                } else {
                    float wf[8];
                    bf16x8_to_float(stage[j * 32 + lane], wf);
#pragma unroll
                    for (int r = 0; r < MP; ++r) {
                        float xf[8];
                        bf16x8_to_float(xv[r * xvecs + v], xf);
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[0][r] = fmaf(wf[e], xf[e], acc[0][r]);
                    }
                }
            }
        }
        if (c == chunks - 1) {
            const int row0 = first_row + g * stride;
#pragma unroll
            for (int q = 0; q < RPW; ++q)
#pragma unroll
                for (int r = 0; r < MP; ++r) acc[q][r] = warp_sum(acc[q][r]);
            if (lane == 0) {
#pragma unroll
                for (int q = 0; q < RPW; ++q) {
                    const int row = row0 + q;
                    if (row < n) {
                        const float b = bias != nullptr ? bias[row] : 0.0f;
                        const float scale = FP8 ? w_scale[row] : 1.0f;
#pragma unroll
                        for (int r = 0; r < MP; ++r) {
                            if (r < m) {
                                const u64 at = (u64)r * n + row;
                                const float y = acc[q][r] * scale + b;
                                if (out_f32) reinterpret_cast<float*>(out)[at] = y;
                                else reinterpret_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16(y);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int q = 0; q < RPW; ++q)
#pragma unroll
                for (int r = 0; r < MP; ++r) acc[q][r] = 0.0f;
        }
    }
    cp_async_wait<0>();  // no copy may land after the block has left
}

// Every variant has one signature (arguments a mode does not use are ignored), so the host
// launches them all the same way (`cuda::gemv`).
#define GEMV_KERNEL(NAME, MODE, MP, FP8)                                                                             \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                    \
        NAME(void* out, int out_f32, const void* x, const __nv_bfloat16* delta, const float* norm_w,                 \
             float* residual_out, const u32* rows, const float* bias, const void* w, const float* w_scale, int m,    \
             int n, int k, float eps, int splits, int head_dim) {                                                    \
        gemv_body<MODE, MP, FP8, GEMV_STAGES, GEMV_STAGE_VECTORS>(out, out_f32, x, delta, norm_w, residual_out, rows,  \
                                                                 bias, w, w_scale, m, n, k, eps, splits, head_dim);  \
    }

GEMV_KERNEL(gemv_m1, GEMV_PLAIN, 1, false)
GEMV_KERNEL(gemv_m2, GEMV_PLAIN, 2, false)
GEMV_KERNEL(gemv_m4, GEMV_PLAIN, 4, false)
GEMV_KERNEL(gemv_m8, GEMV_PLAIN, 8, false)
GEMV_KERNEL(gemv_silu_m1, GEMV_SILU, 1, false)
GEMV_KERNEL(gemv_silu_m2, GEMV_SILU, 2, false)
GEMV_KERNEL(gemv_silu_m4, GEMV_SILU, 4, false)
GEMV_KERNEL(gemv_silu_m8, GEMV_SILU, 8, false)
GEMV_KERNEL(gemv_norm_m1, GEMV_NORM, 1, false)
GEMV_KERNEL(gemv_norm_m2, GEMV_NORM, 2, false)
GEMV_KERNEL(gemv_norm_m4, GEMV_NORM, 4, false)
GEMV_KERNEL(gemv_norm_m8, GEMV_NORM, 8, false)
GEMV_KERNEL(gemv_merge_m1, GEMV_MERGE, 1, false)
GEMV_KERNEL(gemv_fp8_m1, GEMV_PLAIN, 1, true)
GEMV_KERNEL(gemv_fp8_m2, GEMV_PLAIN, 2, true)
GEMV_KERNEL(gemv_fp8_m4, GEMV_PLAIN, 4, true)
GEMV_KERNEL(gemv_fp8_m8, GEMV_PLAIN, 8, true)
GEMV_KERNEL(gemv_fp8_silu_m1, GEMV_SILU, 1, true)
GEMV_KERNEL(gemv_fp8_silu_m2, GEMV_SILU, 2, true)
GEMV_KERNEL(gemv_fp8_silu_m4, GEMV_SILU, 4, true)
GEMV_KERNEL(gemv_fp8_silu_m8, GEMV_SILU, 8, true)
GEMV_KERNEL(gemv_fp8_norm_m1, GEMV_NORM, 1, true)
GEMV_KERNEL(gemv_fp8_norm_m2, GEMV_NORM, 2, true)
GEMV_KERNEL(gemv_fp8_norm_m4, GEMV_NORM, 4, true)
GEMV_KERNEL(gemv_fp8_norm_m8, GEMV_NORM, 8, true)
GEMV_KERNEL(gemv_fp8_merge_m1, GEMV_MERGE, 1, true)

