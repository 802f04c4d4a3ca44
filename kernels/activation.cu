// Gated activations: out[t, i] = act(gate_up[t, i]) * gate_up[t, inter + i], with act SiLU
// (SwiGLU: Llama, Qwen, Mistral, Phi-3) or GELU's tanh approximation (GeGLU: Gemma). Row t is
// blockIdx.x; a row's values are spread over gridDim.y blocks, 8 consecutive values a thread
// (16-byte loads of the gate and the up half), so that a batch of a few rows still fills the GPU
// (`launch::gated_config`). One block a row with scalar loads took 11 us a launch on the 8B
// shape at 32 rows (H200). Any grid is correct: the blocks stride over the row. A `gate_up` that
// is an FP8 GEMM's unscaled output comes with its scales (`col_scales` non-null, 2 * inter of
// them): gate_up[t, c] * row_scales[t] * col_scales[c] is what the activation reads, so that
// product needs no scaling pass of its own (`fp8_scale_output`).
template <bool GELU>
__device__ __forceinline__ float gated(float g, float u) {
    const float act = GELU ? 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                           : g / (1.0f + __expf(-g));
    return act * u;
}

__device__ __forceinline__ void load_float8(const float* __restrict__ p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <bool GELU>
__device__ __forceinline__ void gated_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                              const float* __restrict__ row_scales, const float* __restrict__ col_scales,
                                              int inter) {
    const u64 t = blockIdx.x;
    const __nv_bfloat16* gate = gate_up + t * 2 * inter;
    const __nv_bfloat16* up = gate + inter;
    __nv_bfloat16* o = out + t * inter;
    const float rs = col_scales != nullptr ? row_scales[t] : 1.0f;
    const int stride = gridDim.y * blockDim.x * 8;
    // Block-uniform, as every row is.
    const bool vec = inter % 8 == 0 && (reinterpret_cast<u64>(gate) & 15) == 0 && (reinterpret_cast<u64>(o) & 15) == 0
                     && (reinterpret_cast<u64>(col_scales) & 15) == 0;
    for (int i = (blockIdx.y * blockDim.x + threadIdx.x) * 8; i < inter; i += stride) {
        if (vec) {
            float g[8], u[8], y[8];
            bf16x8_to_float(*reinterpret_cast<const uint4*>(gate + i), g);
            bf16x8_to_float(*reinterpret_cast<const uint4*>(up + i), u);
            if (col_scales != nullptr) {
                float gs[8], us[8];
                load_float8(col_scales + i, gs);
                load_float8(col_scales + inter + i, us);
#pragma unroll
                for (int j = 0; j < 8; j++) g[j] *= rs * gs[j], u[j] *= rs * us[j];
            }
#pragma unroll
            for (int j = 0; j < 8; j++) y[j] = gated<GELU>(g[j], u[j]);
            *reinterpret_cast<uint4*>(o + i) = float8_to_bf16x8(y);
        } else {
            for (int j = i; j < min(i + 8, inter); j++) {
                float g = __bfloat162float(gate[j]), u = __bfloat162float(up[j]);
                if (col_scales != nullptr) g *= rs * col_scales[j], u *= rs * col_scales[inter + j];
                o[j] = __float2bfloat16(gated<GELU>(g, u));
            }
        }
    }
}

extern "C" __global__ void silu_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                        const float* __restrict__ row_scales, const float* __restrict__ col_scales, int inter) {
    PDL_ENTER();
    gated_and_mul<false>(out, gate_up, row_scales, col_scales, inter);
}

extern "C" __global__ void gelu_tanh_and_mul(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate_up,
                                             const float* __restrict__ row_scales, const float* __restrict__ col_scales, int inter) {
    PDL_ENTER();
    gated_and_mul<true>(out, gate_up, row_scales, col_scales, inter);
}

// Logit soft-capping in place: x = cap * tanh(x / cap), one block per row of `cols`.
extern "C" __global__ void softcap_rows(float* __restrict__ x, int cols, float cap) {
    PDL_ENTER();
    float* row = x + (u64)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = cap * tanhf(row[i] / cap);
}
