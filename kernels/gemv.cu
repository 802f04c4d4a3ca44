// Small-M linear layers: y[m, n] = x[m, :] · W[n, :] (+ bias[n]) for m < M ≤ 8, bf16 weights and
// activations, float32 accumulation, bf16 or float32 out. At M ≤ 8 a linear layer is a pure
// weight stream (N·K·2 bytes against M·K·2 of input), so the kernel is built to read W once at
// full bandwidth, for all M rows together:
//
//  * one block of up to GEMV_WARPS warps per multiprocessor (or as many as fit, `launch::gemv_grid`),
//    each warp streaming whole output rows (grid-stride over rows); each lane reads 16-byte
//    vectors (8 bf16) of the row, lane-consecutive, so a warp reads 512 contiguous bytes per
//    load instruction, and issues all of a row chunk's loads (32·UNROLL vectors) before the first
//    FMA: K = 4096 at one row is 512 vectors, one chunk;
//  * the M input rows are staged once per block in shared memory as bf16 ([MP][K]), so every
//    weight vector is multiplied by every row from registers and shared memory; the M partial
//    sums are reduced with warp shuffles and lane 0 writes them. Few, large blocks keep the
//    staging cheap: it is repeated per block, and at the 8B shape's down projection (K = 14336)
//    a block's input is 28 KB per row read from L2, which a grid of thousands of small blocks
//    would pay thousands of times.
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
// Rows m ≥ M of the padded tile (MP is M rounded up to 1, 2, 4, 8) are zeros and never stored.
//
// Under a programmatic dependent launch (`pdl_wait` in common.cuh) each warp issues the loads of
// its first row chunk before waiting for the kernel that produces x; everything else follows the
// wait.

#define GEMV_PLAIN 0
#define GEMV_SILU 1
#define GEMV_NORM 2
// The most warps (output rows in flight) per block; `launch::GEMV_WARPS` on the host, which
// launches fewer for small products (`launch::gemv_block_warps`).
#define GEMV_WARPS 16

__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ uint4 float8_to_bf16x8(const float* f) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
}

// 16-byte weight loads issued per lane before the first use: one chunk of a row.
template <int MP>
struct GemvUnroll {
    static constexpr int value = MP <= 2 ? 16 : 8;
};

template <int MODE, int MP>
__device__ __forceinline__ void gemv_body(void* __restrict__ out, int out_f32, const void* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ delta, const float* __restrict__ norm_w,
                                          float* __restrict__ residual_out, const u32* __restrict__ rows,
                                          const float* __restrict__ bias, const __nv_bfloat16* __restrict__ w, int m,
                                          int n, int k, float eps) {
    constexpr int UNROLL = GemvUnroll<MP>::value;
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    __shared__ float scratch[32];
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(gemv_smem);  // [MP][k]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int vecs = k >> 3;
    const int warps = blockDim.x >> 5;
    const int first_row = blockIdx.x * warps + warp;

    // ---- The first weight loads, before waiting for the previous kernel. ----
    // Weights are never written by a kernel, so under a programmatic dependent launch these loads
    // may run while the kernel that produces x is still finishing: the DRAM round trip of the
    // warp's first row chunk overlaps it instead of following it.
    // `wv` is the one chunk buffer: the main loop reloads it for every chunk but this first one.
    uint4 wv[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
        const int v = j * 32 + lane;
        wv[j] = first_row < n && v < vecs ? __ldg(reinterpret_cast<const uint4*>(w + (u64)first_row * k) + v)
                                                  : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
    pdl_trigger();

    // ---- Stage the M input rows (bf16) in shared memory, with the whole block. ----
    uint4* xs_vec = reinterpret_cast<uint4*>(xs);
    if (MODE == GEMV_PLAIN) {
        const uint4* src = reinterpret_cast<const uint4*>(x);
        for (int i = threadIdx.x; i < MP * vecs; i += blockDim.x) xs_vec[i] = i < m * vecs ? src[i] : make_uint4(0, 0, 0, 0);
    } else if (MODE == GEMV_SILU) {
        const uint4* gate_up = reinterpret_cast<const uint4*>(x);  // row r: gate vectors [0, vecs), up [vecs, 2 vecs)
        for (int i = threadIdx.x; i < MP * vecs; i += blockDim.x) {
            const int r = i / vecs, v = i - r * vecs;
            if (r >= m) {
                xs_vec[i] = make_uint4(0, 0, 0, 0);
                continue;
            }
            float g[8], u[8], a[8];
            bf16x8_to_float(gate_up[(u64)r * 2 * vecs + v], g);
            bf16x8_to_float(gate_up[(u64)r * 2 * vecs + vecs + v], u);
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
    __syncthreads();

    // ---- Stream the weight rows: one warp per output row. ----
    const uint4* xv = reinterpret_cast<const uint4*>(xs);
    bool first_chunk = true;
    for (int row = first_row; row < n; row += gridDim.x * warps) {
        const uint4* wrow = reinterpret_cast<const uint4*>(w + (u64)row * k);
        float acc[MP];
#pragma unroll
        for (int r = 0; r < MP; ++r) acc[r] = 0.0f;
        for (int base = 0; base < vecs; base += 32 * UNROLL) {
            if (first_chunk) {
                first_chunk = false;
            } else {
#pragma unroll
                for (int j = 0; j < UNROLL; ++j) {
                    const int v = base + j * 32 + lane;
                    wv[j] = v < vecs ? __ldg(wrow + v) : make_uint4(0, 0, 0, 0);
                }
            }
#pragma unroll
            for (int j = 0; j < UNROLL; ++j) {
                const int v = base + j * 32 + lane;
                if (v < vecs) {
                    float wf[8];
                    bf16x8_to_float(wv[j], wf);
#pragma unroll
                    for (int r = 0; r < MP; ++r) {
                        float xf[8];
                        bf16x8_to_float(xv[r * vecs + v], xf);
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[r] = fmaf(wf[e], xf[e], acc[r]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < MP; ++r) acc[r] = warp_sum(acc[r]);
        if (lane == 0) {
            const float b = bias != nullptr ? bias[row] : 0.0f;
#pragma unroll
            for (int r = 0; r < MP; ++r) {
                if (r < m) {
                    const u64 at = (u64)r * n + row;
                    if (out_f32) reinterpret_cast<float*>(out)[at] = acc[r] + b;
                    else reinterpret_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16(acc[r] + b);
                }
            }
        }
    }
}

// Every variant has one signature (arguments a mode does not use are ignored), so the host
// launches them all the same way (`cuda::gemv`).
#define GEMV_KERNEL(NAME, MODE, MP)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                    \
        NAME(void* out, int out_f32, const void* x, const __nv_bfloat16* delta, const float* norm_w,                 \
             float* residual_out, const u32* rows, const float* bias, const __nv_bfloat16* w, int m, int n, int k,   \
             float eps) {                                                                                            \
        gemv_body<MODE, MP>(out, out_f32, x, delta, norm_w, residual_out, rows, bias, w, m, n, k, eps);             \
    }

GEMV_KERNEL(gemv_m1, GEMV_PLAIN, 1)
GEMV_KERNEL(gemv_m2, GEMV_PLAIN, 2)
GEMV_KERNEL(gemv_m4, GEMV_PLAIN, 4)
GEMV_KERNEL(gemv_m8, GEMV_PLAIN, 8)
GEMV_KERNEL(gemv_silu_m1, GEMV_SILU, 1)
GEMV_KERNEL(gemv_silu_m2, GEMV_SILU, 2)
GEMV_KERNEL(gemv_silu_m4, GEMV_SILU, 4)
GEMV_KERNEL(gemv_silu_m8, GEMV_SILU, 8)
GEMV_KERNEL(gemv_norm_m1, GEMV_NORM, 1)
GEMV_KERNEL(gemv_norm_m2, GEMV_NORM, 2)
GEMV_KERNEL(gemv_norm_m4, GEMV_NORM, 4)
GEMV_KERNEL(gemv_norm_m8, GEMV_NORM, 8)
