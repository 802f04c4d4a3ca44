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
