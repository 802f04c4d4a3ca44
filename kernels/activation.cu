// SiLU-and-multiply: out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i].
extern "C" __global__ void silu_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                        int inter) {
    const int t = blockIdx.x;
    const __nv_bfloat16* row = gate_up + (u64)t * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        const float g = __bfloat162float(row[i]), u = __bfloat162float(row[inter + i]);
        out[(u64)t * inter + i] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
    }
}

// GELU (tanh approximation)-and-multiply (Gemma): out[t, i] = gelu_tanh(gate[t, i]) * up[t, i].
extern "C" __global__ void gelu_tanh_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                             int inter) {
    const int t = blockIdx.x;
    const __nv_bfloat16* row = gate_up + (u64)t * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        const float g = __bfloat162float(row[i]), u = __bfloat162float(row[inter + i]);
        const float gelu = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
        out[(u64)t * inter + i] = __float2bfloat16(gelu * u);
    }
}

// Logit soft-capping in place: x = cap * tanh(x / cap), one block per row of `cols`.
extern "C" __global__ void softcap_rows(float* __restrict__ x, int cols, float cap) {
    float* row = x + (u64)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = cap * tanhf(row[i] / cap);
}
