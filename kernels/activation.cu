// Gated activations: out[t, i] = act(gate_up[t, i]) * gate_up[t, inter + i], one block per row,
// with act SiLU (SwiGLU: Llama, Qwen, Mistral, Phi-3) or GELU's tanh approximation (GeGLU: Gemma).
template <bool GELU>
__device__ __forceinline__ void gated_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                              int inter) {
    const int t = blockIdx.x;
    const __nv_bfloat16* row = gate_up + (u64)t * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        const float g = __bfloat162float(row[i]), u = __bfloat162float(row[inter + i]);
        const float act = GELU ? 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                               : g / (1.0f + __expf(-g));
        out[(u64)t * inter + i] = __float2bfloat16(act * u);
    }
}

extern "C" __global__ void silu_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                        int inter) {
    PDL_ENTER();
    gated_and_mul<false>(out, gate_up, inter);
}

extern "C" __global__ void gelu_tanh_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                             int inter) {
    PDL_ENTER();
    gated_and_mul<true>(out, gate_up, inter);
}

// Logit soft-capping in place: x = cap * tanh(x / cap), one block per row of `cols`.
extern "C" __global__ void softcap_rows(float* __restrict__ x, int cols, float cap) {
    PDL_ENTER();
    float* row = x + (u64)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = cap * tanhf(row[i] / cap);
}
