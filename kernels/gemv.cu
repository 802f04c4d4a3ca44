// Small-M linear layers: y[m, n] = x[m, :] · W[n, :] (+ bias[n]) for m < M ≤ 8, bf16 weights and
// activations, float32 accumulation, bf16 or float32 out. At M ≤ 8 a linear layer is a pure
// weight stream (N·K·2 bytes against M·K·2 of input), so the kernel is built to read W once at
// full bandwidth, for all M rows together:
//
//  * one warp per output row n (grid-stride over rows); each lane reads 16-byte vectors (8 bf16)
//    of the row, lane-consecutive, so a warp reads 512 contiguous bytes per load instruction;
//  * all of a row's loads for up to 32·GEMV_UNROLL vectors are issued before the first FMA:
//    K = 576 is 72 vectors (3 loads per lane), K = 1536 is 192 (6 per lane), one round trip;
//  * the M input rows are staged once per block in shared memory as bf16 ([MP][K], at most
//    8·1536·2 = 24 KB), so every weight vector is multiplied by every row from registers and
//    shared memory; the M partial sums are reduced with warp shuffles and lane 0 writes them.
//
// Bytes: N·K·2 of weights from DRAM (read once), M·K·2 (plain) of input per block from L2,
// M·N·(2|4) out. SmolLM2-135M at M = 1: qkv 960×576 (1.1 MB), o_proj 576×576 (0.66 MB), gate_up
// 3072×576 (3.5 MB), down 576×1536 (1.8 MB), lm_head 49152×576 (57 MB, ~19 µs at 3 TB/s). The
// per-layer ones are a fraction of a microsecond of bandwidth: they are latency-bound (one DRAM
// round trip plus the staging), so the grid only needs enough warps to issue every row at once.
//
// The staging step is where neighbouring element-wise kernels fold in (the `MODE`):
//  * GEMV_PLAIN: x is a bf16 [M, K] matrix (K a multiple of 8, 16-byte aligned);
//  * GEMV_SILU:  x is the gate_up buffer [M, 2K]; the block computes act = silu(gate) · up
//    exactly as `silu_and_mul` does (rounded to bf16), so the separate kernel is skipped;
//  * GEMV_NORM:  x is the float32 residual [*, K]; the block computes r = x + delta (delta bf16,
//    optional) and rmsnorm(r) · norm_w exactly as `fused_add_rmsnorm` does (rounded to bf16).
//    Row m reads residual row rows[m] when `rows` is given (the final norm of the wanted rows).
//    Block 0 alone writes r to `residual_out` (optional), which must be a different buffer from
//    x: every block reads x, so nobody may write it during the launch (the caller ping-pongs
//    two residual buffers; see `run_layers`).
// Rows m ≥ M of the padded tile (MP is M rounded up to 1, 2, 4, 8) are zeros and never stored.

#define GEMV_PLAIN 0
#define GEMV_SILU 1
#define GEMV_NORM 2
// Warps (output rows in flight) per block; `launch::GEMV_WARPS` on the host.
#define GEMV_WARPS 4
// 16-byte weight loads issued per lane before the first use.
#define GEMV_UNROLL 8

__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

template <int MODE, int MP>
__device__ __forceinline__ void gemv_body(void* __restrict__ out, int out_f32, const void* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ delta, const float* __restrict__ norm_w,
                                          float* __restrict__ residual_out, const u32* __restrict__ rows,
                                          const float* __restrict__ bias, const __nv_bfloat16* __restrict__ w, int m,
                                          int n, int k, float eps) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(gemv_smem);  // [MP][k]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int vecs = k >> 3;

    // ---- Stage the M input rows (bf16) in shared memory. ----
    if (MODE == GEMV_PLAIN) {
        const uint4* src = reinterpret_cast<const uint4*>(x);
        uint4* dst = reinterpret_cast<uint4*>(xs);
        for (int i = threadIdx.x; i < MP * vecs; i += blockDim.x) dst[i] = i < m * vecs ? src[i] : make_uint4(0, 0, 0, 0);
    } else if (MODE == GEMV_SILU) {
        const __nv_bfloat16* gate_up = reinterpret_cast<const __nv_bfloat16*>(x);
#pragma unroll
        for (int r = 0; r < MP; ++r) {
            const __nv_bfloat16* row = gate_up + (u64)r * 2 * k;
            for (int c = threadIdx.x; c < k; c += blockDim.x) {
                float v = 0.0f;
                if (r < m) {
                    const float g = __bfloat162float(row[c]), u = __bfloat162float(row[k + c]);
                    v = g / (1.0f + __expf(-g)) * u;
                }
                xs[r * k + c] = __float2bfloat16(v);
            }
        }
    } else {
        // One warp per row: K = 576 is 18 floats per lane, cheap enough to redo in every block.
        const float* residual = reinterpret_cast<const float*>(x);
        const bool keep = residual_out != nullptr && blockIdx.x == 0;
        for (int r = warp; r < MP; r += GEMV_WARPS) {
            __nv_bfloat16* dst = xs + r * k;
            if (r >= m) {
                for (int c = lane; c < k; c += 32) dst[c] = __float2bfloat16(0.0f);
                continue;
            }
            const u64 src = rows != nullptr ? (u64)rows[r] : (u64)r;
            const float* xr = residual + src * k;
            const __nv_bfloat16* dr = delta != nullptr ? delta + src * k : nullptr;
            float sum_sq = 0.0f;
            for (int c = lane; c < k; c += 32) {
                float v = xr[c];
                if (dr != nullptr) v += __bfloat162float(dr[c]);
                sum_sq += v * v;
            }
            const float inv = rsqrtf(warp_sum(sum_sq) / k + eps);
            for (int c = lane; c < k; c += 32) {
                float v = xr[c];
                if (dr != nullptr) v += __bfloat162float(dr[c]);
                if (keep) residual_out[src * k + c] = v;
                dst[c] = __float2bfloat16(norm_w[c] * (v * inv));
            }
        }
    }
    __syncthreads();

    // ---- Stream the weight rows: one warp per output row. ----
    const uint4* xv = reinterpret_cast<const uint4*>(xs);
    for (int row = blockIdx.x * GEMV_WARPS + warp; row < n; row += gridDim.x * GEMV_WARPS) {
        const uint4* wrow = reinterpret_cast<const uint4*>(w + (u64)row * k);
        float acc[MP];
#pragma unroll
        for (int r = 0; r < MP; ++r) acc[r] = 0.0f;
        for (int base = 0; base < vecs; base += 32 * GEMV_UNROLL) {
            uint4 wv[GEMV_UNROLL];
#pragma unroll
            for (int j = 0; j < GEMV_UNROLL; ++j) {
                const int v = base + j * 32 + lane;
                wv[j] = v < vecs ? __ldg(wrow + v) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int j = 0; j < GEMV_UNROLL; ++j) {
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
