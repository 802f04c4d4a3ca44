// Embedding gather: the residual stream (float32) of each token is its row of the bf16 table,
// times `scale` (Gemma's sqrt(hidden); 1 for most models).
extern "C" __global__ void embedding_gather(float* __restrict__ out, const __nv_bfloat16* __restrict__ table,
                                            const u32* __restrict__ tokens, int hidden, float scale) {
    PDL_ENTER();
    const int t = blockIdx.x;
    const __nv_bfloat16* row = table + (u64)tokens[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[(u64)t * hidden + i] = __bfloat162float(row[i]) * scale;
}
