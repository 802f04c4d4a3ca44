// RMSNorm fused with the residual add: residual += delta (if given); out = rmsnorm(residual) * w
// (if `out` is given: the last layer's add needs no normalised copy of every row). A delta that is
// an FP8 GEMM's unscaled output comes with its scales (`delta_col_scales` non-null): delta[t, i] *
// delta_row_scales[t] * delta_col_scales[i] is added, so that product needs no scaling pass of
// its own (`fp8_scale_output`); the sum is then one rounding closer to the exact product.
// One block per token; the residual stream stays float32, the normalised output is bf16 for the
// next matrix product.
//
// Each thread takes 8 consecutive values (two float4 of the residual, one 16-byte vector of the
// delta) and keeps them in registers from the sum of squares to the scaling, so a row costs one
// round of loads in flight at once (the host sizes the block at `hidden / 8` threads:
// `launch::norm_threads`). At 9-64 rows, one block a row leaves most multiprocessors idle and the
// row's latency is the launch's: the strided scalar loop this replaces, which read every value
// twice, took 7.8 us a launch on the 8B shape at 32 rows (H200). Rows that are not 8-aligned, or
// wider than 16 values a thread, take that loop.
//
// `fused_add_rmsnorm_partials` is the same with a delta still in pieces: the float32 partial
// products of a matrix product whose K was split (`gemm::split_k_partials`), summed here in split
// order, so the product needs no reduce launch of its own and the sum is not rounded to bf16
// before it joins the residual.

// Where a row's delta comes from: `present()` says whether there is one at all (the same answer
// for every thread of the block), `load(i, d)` fills d with the 8 values from column i, `at(i)`
// gives the one at column i.
struct Bf16Delta {
    const __nv_bfloat16* delta;     // this row's, or null
    float row_scale;
    const float* col_scales;        // null unless an FP8 GEMM's unscaled output
    __device__ __forceinline__ bool present() const { return delta != nullptr; }
    __device__ __forceinline__ void load(int i, float d[8]) const {
        bf16x8_to_float(*reinterpret_cast<const uint4*>(delta + i), d);
        if (col_scales != nullptr) {
            const float4 p = *reinterpret_cast<const float4*>(col_scales + i), q = *reinterpret_cast<const float4*>(col_scales + i + 4);
            const float cs[8] = {p.x, p.y, p.z, p.w, q.x, q.y, q.z, q.w};
#pragma unroll
            for (int j = 0; j < 8; j++) d[j] *= row_scale * cs[j];
        }
    }
    __device__ __forceinline__ float at(int i) const {
        return col_scales != nullptr ? __bfloat162float(delta[i]) * (row_scale * col_scales[i]) : __bfloat162float(delta[i]);
    }
};

struct PartialsDelta {
    const float* partials;          // this row's values in split 0; split s is `stride` floats on
    int splits;
    u64 stride;
    __device__ __forceinline__ bool present() const { return true; }
    __device__ __forceinline__ void load(int i, float d[8]) const {
#pragma unroll
        for (int j = 0; j < 8; j++) d[j] = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float* p = partials + (u64)s * stride + i;
            const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
            d[0] += a.x, d[1] += a.y, d[2] += a.z, d[3] += a.w, d[4] += b.x, d[5] += b.y, d[6] += b.z, d[7] += b.w;
        }
    }
    __device__ __forceinline__ float at(int i) const {
        float v = 0.0f;
        for (int s = 0; s < splits; s++) v += partials[(u64)s * stride + i];
        return v;
    }
};

template <int CHUNKS, typename Delta>
__device__ __forceinline__ void add_rmsnorm_vec8(float* __restrict__ x, const Delta& delta, const float* __restrict__ weight,
                                                 __nv_bfloat16* __restrict__ out, int hidden, float eps, float* scratch) {
    float v[CHUNKS][8];
    float sum_sq = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        const int i = (threadIdx.x + c * blockDim.x) * 8;
        if (i < hidden) {
            const float4 a = *reinterpret_cast<const float4*>(x + i), b = *reinterpret_cast<const float4*>(x + i + 4);
            v[c][0] = a.x, v[c][1] = a.y, v[c][2] = a.z, v[c][3] = a.w, v[c][4] = b.x, v[c][5] = b.y, v[c][6] = b.z, v[c][7] = b.w;
            if (delta.present()) {
                float d[8];
                delta.load(i, d);
#pragma unroll
                for (int j = 0; j < 8; j++) v[c][j] += d[j];
                *reinterpret_cast<float4*>(x + i) = make_float4(v[c][0], v[c][1], v[c][2], v[c][3]);
                *reinterpret_cast<float4*>(x + i + 4) = make_float4(v[c][4], v[c][5], v[c][6], v[c][7]);
            }
#pragma unroll
            for (int j = 0; j < 8; j++) sum_sq += v[c][j] * v[c][j];
        }
    }
    const float inv = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    if (out == nullptr) return;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        const int i = (threadIdx.x + c * blockDim.x) * 8;
        if (i < hidden) {
            const float4 a = *reinterpret_cast<const float4*>(weight + i), b = *reinterpret_cast<const float4*>(weight + i + 4);
            const float w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            float y[8];
#pragma unroll
            for (int j = 0; j < 8; j++) y[j] = w[j] * (v[c][j] * inv);
            *reinterpret_cast<uint4*>(out + i) = float8_to_bf16x8(y);
        }
    }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<u64>(p) & 15) == 0; }

// One row: the vectorized body where the row and its buffers allow it (`vec`, block-uniform),
// else a strided scalar loop.
template <typename Delta>
__device__ __forceinline__ void add_rmsnorm_row(float* __restrict__ x, const Delta& delta, bool vec, const float* __restrict__ weight,
                                                __nv_bfloat16* __restrict__ o, int hidden, float eps, float* scratch) {
    if (vec && hidden <= (int)blockDim.x * 8) {
        add_rmsnorm_vec8<1>(x, delta, weight, o, hidden, eps, scratch);
        return;
    }
    if (vec && hidden <= (int)blockDim.x * 16) {
        add_rmsnorm_vec8<2>(x, delta, weight, o, hidden, eps, scratch);
        return;
    }
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = x[i];
        if (delta.present()) {
            v += delta.at(i);
            x[i] = v;
        }
        sum_sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    if (o == nullptr) return;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __float2bfloat16(weight[i] * (x[i] * inv));
}

extern "C" __global__ void fused_add_rmsnorm(float* __restrict__ residual, const __nv_bfloat16* __restrict__ delta,
                                             const float* __restrict__ delta_row_scales, const float* __restrict__ delta_col_scales,
                                             const float* __restrict__ weight, __nv_bfloat16* __restrict__ out,
                                             int hidden, float eps) {
    PDL_ENTER();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    float* x = residual + (u64)t * hidden;
    const __nv_bfloat16* d = delta != nullptr ? delta + (u64)t * hidden : nullptr;
    const float* cs = d != nullptr ? delta_col_scales : nullptr;
    const float rs = cs != nullptr ? delta_row_scales[t] : 1.0f;
    __nv_bfloat16* o = out != nullptr ? out + (u64)t * hidden : nullptr;
    // Block-uniform: the same for every thread.
    const bool vec = hidden % 8 == 0 && aligned16(x) && aligned16(d) && aligned16(cs) && aligned16(weight) && aligned16(o);
    add_rmsnorm_row(x, Bf16Delta{d, rs, cs}, vec, weight, o, hidden, eps, scratch);
}

// `residual += sum of the splits' partials`, then as `fused_add_rmsnorm`: `partials` holds
// `splits` blocks of `split_stride` floats, each the [rows, hidden] partial product of one slice
// of K (row t at t * hidden).
extern "C" __global__ void fused_add_rmsnorm_partials(float* __restrict__ residual, const float* __restrict__ partials, int splits,
                                                      u64 split_stride, const float* __restrict__ weight,
                                                      __nv_bfloat16* __restrict__ out, int hidden, float eps) {
    PDL_ENTER();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    float* x = residual + (u64)t * hidden;
    const float* p = partials + (u64)t * hidden;
    __nv_bfloat16* o = out != nullptr ? out + (u64)t * hidden : nullptr;
    const bool vec = hidden % 8 == 0 && split_stride % 4 == 0 && aligned16(x) && aligned16(p) && aligned16(weight) && aligned16(o);
    add_rmsnorm_row(x, PartialsDelta{p, splits, split_stride}, vec, weight, o, hidden, eps, scratch);
}

// `out = bf16(sum of the splits' partials)`, `elements` values (the sum `fused_add_rmsnorm_partials`
// adds, for a consumer that does not take the pieces); grid-stride.
extern "C" __global__ void sum_partials_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ partials, int splits,
                                             u64 split_stride, u64 elements) {
    PDL_ENTER();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < elements; i += (u64)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; s++) v += partials[(u64)s * split_stride + i];
        out[i] = __float2bfloat16(v);
    }
}

// The final norm, only for the rows whose logits are wanted: out[r] = rmsnorm(residual[rows[r]]).
extern "C" __global__ void rmsnorm_rows(const float* __restrict__ residual, const u32* __restrict__ rows,
                                        const float* __restrict__ weight, __nv_bfloat16* __restrict__ out,
                                        int hidden, float eps) {
    PDL_ENTER();
    __shared__ float scratch[32];
    const float* x = residual + (u64)rows[blockIdx.x] * hidden;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) sum_sq += x[i] * x[i];
    const float inv = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(u64)blockIdx.x * hidden + i] = __float2bfloat16(weight[i] * (x[i] * inv));
}

// RMSNorm of bf16 rows into bf16 rows (Gemma's norms on the attention and MLP outputs before
// they join the residual): out[t] = rmsnorm(x[t]) * w, one block per row.
extern "C" __global__ void rmsnorm_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ weight,
                                        __nv_bfloat16* __restrict__ out, int hidden, float eps) {
    PDL_ENTER();
    __shared__ float scratch[32];
    const __nv_bfloat16* row = x + (u64)blockIdx.x * hidden;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = __bfloat162float(row[i]);
        sum_sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(u64)blockIdx.x * hidden + i] = __float2bfloat16(weight[i] * (__bfloat162float(row[i]) * inv));
}

// Per-head RMSNorm in place (Qwen3's and Gemma's q/k norms): heads first_head .. first_head +
// num_heads - 1 of every row (rows `row_width` wide, heads `head_dim` wide, head_dim a multiple of
// 32 up to 256), one shared [head_dim] weight. One warp per (row, head): block (t, y) takes heads
// 4y .. 4y + 3 of row t.
extern "C" __global__ void head_rmsnorm(__nv_bfloat16* __restrict__ x, const float* __restrict__ weight,
                                        int row_width, int first_head, int num_heads, int head_dim, float eps) {
    PDL_ENTER();
    const int lane = threadIdx.x & 31, head = blockIdx.y * 4 + (threadIdx.x >> 5);
    if (head >= num_heads) return;
    __nv_bfloat16* h = x + (u64)blockIdx.x * row_width + (u64)(first_head + head) * head_dim;
    float v[8];
    float sum_sq = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int i = lane + 32 * j;
        v[j] = i < head_dim ? __bfloat162float(h[i]) : 0.0f;
        sum_sq += v[j] * v[j];
    }
    const float inv = rsqrtf(warp_sum(sum_sq) / head_dim + eps);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int i = lane + 32 * j;
        if (i < head_dim) h[i] = __float2bfloat16(weight[i] * (v[j] * inv));
    }
}
