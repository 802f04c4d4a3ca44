// RoPE fused with the KV-cache write. `qkv` holds each token's Q heads, then K heads, then V heads
// (bf16, the QKV projection's output, bias already added by `add_bias` when the model has one).
// Q and K are rotated in place over their first `rotary_dim` dimensions (rotate-half form:
// dimension i pairs with i + rotary_dim / 2, or the interleaved form 2i / 2i + 1 when
// `interleaved`; the rest pass through), cosines and sines times `magnitude` (YaRN's attention
// factor, else 1); K and V are written to the cache slot of the token. Cache layout: [num_blocks, num_kv_heads, block_size, head_dim], slot = block * bs + offset.
extern "C" __global__ void rope_and_cache(__nv_bfloat16* __restrict__ qkv, const u32* __restrict__ positions,
                                          const u32* __restrict__ slots, const float* __restrict__ inv_freq,
                                          __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
                                          int num_heads, int num_kv_heads, int head_dim, int block_size,
                                          float position_scale, int interleaved, int rotary_dim, float magnitude) {
    PDL_ENTER();
    const int t = blockIdx.x;
    const int half = rotary_dim / 2;
    const int row = (num_heads + 2 * num_kv_heads) * head_dim;
    __nv_bfloat16* q = qkv + (u64)t * row;
    __nv_bfloat16* k = q + num_heads * head_dim;
    const __nv_bfloat16* v = k + num_kv_heads * head_dim;
    const float pos = (float)positions[t] / position_scale;
    // Rotate every pair of every Q and K head.
    const int pairs = (num_heads + num_kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half, i = p % half;
        __nv_bfloat16* h = head < num_heads ? q + head * head_dim : k + (head - num_heads) * head_dim;
        const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        rope_rotate(__bfloat162float(h[a]), __bfloat162float(h[b]), pos * inv_freq[i], magnitude, h[a], h[b]);
    }
    __syncthreads();
    const u64 slot = slots[t];
    const u64 block = slot / block_size, offset = slot % block_size;
    for (int e = threadIdx.x; e < num_kv_heads * head_dim; e += blockDim.x) {
        const int kv_head = e / head_dim, d = e % head_dim;
        const u64 at = ((block * num_kv_heads + kv_head) * block_size + offset) * head_dim + d;
        k_cache[at] = k[e];
        v_cache[at] = v[e];
    }
}

// Adds a bias row to every row of a bf16 matrix (Qwen2's QKV bias).
extern "C" __global__ void add_bias(__nv_bfloat16* __restrict__ x, const float* __restrict__ bias, int cols) {
    PDL_ENTER();
    const int r = blockIdx.x;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        x[(u64)r * cols + i] = __float2bfloat16(__bfloat162float(x[(u64)r * cols + i]) + bias[i]);
}
