// RoPE fused with the KV-cache write. `qkv` holds each token's Q heads, then K heads, then V heads
// (bf16, the QKV projection's output, bias already added by `add_bias` when the model has one).
// Q and K are rotated in place over their first `rotary_dim` dimensions (rotate-half form:
// dimension i pairs with i + rotary_dim / 2, or the interleaved form 2i / 2i + 1 when
// `interleaved`; the rest pass through), cosines and sines times `magnitude` (YaRN's attention
// factor, else 1); K and V are written to the cache slot of the token. Cache layout: [num_blocks,
// num_kv_heads, block_size, head_dim], slot = block * bs + offset.
// The cache holds bf16 values or, in `rope_and_cache_fp8`, E4M3 bytes (the FP8 cache, scale 1). A
// key's rotated pair goes to the cache from the rotation's floats, so an E4M3 cache rounds it
// once, as the CPU and the fused decode path do, not through bf16 first.
template <typename T>
__device__ void rope_and_cache_impl(__nv_bfloat16* __restrict__ qkv, const u32* __restrict__ positions,
                                    const u32* __restrict__ slots, const float* __restrict__ inv_freq,
                                    T* __restrict__ k_cache, T* __restrict__ v_cache, int num_heads, int num_kv_heads,
                                    int head_dim, int block_size, float position_scale, int interleaved, int rotary_dim,
                                    float magnitude) {
    const int t = blockIdx.x;
    const int half = rotary_dim / 2;
    const int row = (num_heads + 2 * num_kv_heads) * head_dim;
    __nv_bfloat16* q = qkv + (u64)t * row;
    __nv_bfloat16* k = q + num_heads * head_dim;
    const __nv_bfloat16* v = k + num_kv_heads * head_dim;
    const float pos = (float)positions[t] / position_scale;
    const u64 slot = slots[t];
    const u64 block = slot / block_size, offset = slot % block_size;
    // Rotate every pair of every Q and K head; a key's pair also goes to the cache.
    const int pairs = (num_heads + num_kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half, i = p % half;
        __nv_bfloat16* h = head < num_heads ? q + head * head_dim : k + (head - num_heads) * head_dim;
        const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        const float2 y = rope_rotation(__bfloat162float(h[a]), __bfloat162float(h[b]), pos * inv_freq[i], magnitude);
        store_cache_value(h[a], y.x);
        store_cache_value(h[b], y.y);
        if (head >= num_heads) {
            T* dst = k_cache + ((block * num_kv_heads + (head - num_heads)) * block_size + offset) * head_dim;
            store_cache_value(dst[a], y.x);
            store_cache_value(dst[b], y.y);
        }
    }
    // Values, and the key dimensions past rotary_dim, which pass through unrotated.
    for (int e = threadIdx.x; e < num_kv_heads * head_dim; e += blockDim.x) {
        const int kv_head = e / head_dim, d = e % head_dim;
        const u64 at = ((block * num_kv_heads + kv_head) * block_size + offset) * head_dim + d;
        if (d >= rotary_dim) store_cache_value(k_cache[at], __bfloat162float(k[e]));
        store_cache_value(v_cache[at], __bfloat162float(v[e]));
    }
}

#define ROPE_AND_CACHE_PARAMS(T)                                                                                     \
    __nv_bfloat16 *qkv, const u32 *positions, const u32 *slots, const float *inv_freq, T *k_cache, T *v_cache,       \
        int num_heads, int num_kv_heads, int head_dim, int block_size, float position_scale, int interleaved,         \
        int rotary_dim, float magnitude
#define ROPE_AND_CACHE_ARGS                                                                                          \
    qkv, positions, slots, inv_freq, k_cache, v_cache, num_heads, num_kv_heads, head_dim, block_size, position_scale, \
        interleaved, rotary_dim, magnitude
extern "C" __global__ void rope_and_cache(ROPE_AND_CACHE_PARAMS(__nv_bfloat16)) {
    PDL_ENTER();
    rope_and_cache_impl(ROPE_AND_CACHE_ARGS);
}
extern "C" __global__ void rope_and_cache_fp8(ROPE_AND_CACHE_PARAMS(unsigned char)) {
    PDL_ENTER();
    rope_and_cache_impl(ROPE_AND_CACHE_ARGS);
}

// Adds a bias row to every row of a bf16 matrix (Qwen2's QKV bias).
extern "C" __global__ void add_bias(__nv_bfloat16* __restrict__ x, const float* __restrict__ bias, int cols) {
    PDL_ENTER();
    const int r = blockIdx.x;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        x[(u64)r * cols + i] = __float2bfloat16(__bfloat162float(x[(u64)r * cols + i]) + bias[i]);
}
