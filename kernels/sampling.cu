// Greedy sampling on the device: the index of the largest logit of each row (the first on ties,
// as torch.argmax), so only one integer per sequence crosses to the host.
extern "C" __global__ void argmax_rows(u32* __restrict__ out, const float* __restrict__ logits, int vocab) {
    __shared__ float best_s[32];
    __shared__ int index_s[32];
    const float* row = logits + (u64)blockIdx.x * vocab;
    float best = -INFINITY;
    int index = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > best) { best = v; index = i; }
    }
    // Warp then block reduction, preferring the lower index on equal values.
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffff, best, offset);
        const int oi = __shfl_xor_sync(0xffffffff, index, offset);
        if (ob > best || (ob == best && oi < index)) { best = ob; index = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_s[warp] = best; index_s[warp] = index; }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        best = lane < warps ? best_s[lane] : -INFINITY;
        index = lane < warps ? index_s[lane] : 0x7fffffff;
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffff, best, offset);
            const int oi = __shfl_xor_sync(0xffffffff, index, offset);
            if (ob > best || (ob == best && oi < index)) { best = ob; index = oi; }
        }
        if (lane == 0) out[blockIdx.x] = (u32)index;
    }
}

// Deterministic uniform values in [-scale, scale) from a hash of (seed, index): dummy weights made
// on the device, for model shapes too large to generate on the host.
extern "C" __global__ void init_uniform_bf16(__nv_bfloat16* __restrict__ out, u64 n, u64 seed, float scale) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float unit = (float)(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        out[i] = __float2bfloat16((2.0f * unit - 1.0f) * scale);
    }
}
