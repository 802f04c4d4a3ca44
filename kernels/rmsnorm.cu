// RMSNorm fused with the residual add: residual += delta (if given); out = rmsnorm(residual) * w
// (if `out` is given: the last layer's add needs no normalised copy of every row).
// One block per token; the residual stream stays float32, the normalised output is bf16 for the
// next matrix product.
extern "C" __global__ void fused_add_rmsnorm(float* __restrict__ residual, const __nv_bfloat16* __restrict__ delta,
                                             const float* __restrict__ weight, __nv_bfloat16* __restrict__ out,
                                             int hidden, float eps) {
    PDL_ENTER();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    float* x = residual + (u64)t * hidden;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = x[i];
        if (delta != nullptr) {
            v += __bfloat162float(delta[(u64)t * hidden + i]);
            x[i] = v;
        }
        sum_sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    if (out == nullptr) return;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(u64)t * hidden + i] = __float2bfloat16(weight[i] * (x[i] * inv));
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
