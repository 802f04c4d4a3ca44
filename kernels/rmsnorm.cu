// RMSNorm fused with the residual add: residual += delta (if given); out = rmsnorm(residual) * w
// (if `out` is given: the last layer's add needs no normalised copy of every row).
// One block per token; the residual stream stays float32, the normalised output is bf16 for the
// next matrix product.
extern "C" __global__ void fused_add_rmsnorm(float* __restrict__ residual, const __nv_bfloat16* __restrict__ delta,
                                             const float* __restrict__ weight, __nv_bfloat16* __restrict__ out,
                                             int hidden, float eps) {
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
    __shared__ float scratch[32];
    const float* x = residual + (u64)rows[blockIdx.x] * hidden;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) sum_sq += x[i] * x[i];
    const float inv = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(u64)blockIdx.x * hidden + i] = __float2bfloat16(weight[i] * (x[i] * inv));
}
