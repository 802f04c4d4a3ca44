// Shared helpers for pagedserve's kernels. NVRTC compiles each kernel file with this header
// prepended; keep it free of host code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC has no <cmath>: the constants kernels need.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

// ---- Programmatic dependent launch (sm_90 on; `launchers::launch` on the host) ----
// A kernel launched as a programmatic dependent may start while the kernel before it still runs.
// `pdl_wait` blocks until that kernel has finished and its writes are visible: before it, a
// kernel may read only what that kernel does not write (weights; the host's uploads; what kernels
// before it wrote, since each of our kernels triggers only after its own wait, and a kernel not
// launched as a dependent starts after its predecessor ends); every activation read and every
// write comes after it. `pdl_trigger` lets the next kernel's blocks be scheduled as soon as every
// block of this one has started. Both are no-ops when the launch was an ordinary one, and before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The first statement of every kernel that reads no weights before its wait.
#define PDL_ENTER() \
    pdl_wait();     \
    pdl_trigger()

// The next product's weights into L2 while a latency-bound kernel runs (the decode attention of
// a few rows leaves DRAM mostly idle for its ~10 us): block b of the grid prefetches its share of
// [p, p + bytes) in pieces of at most 64 KB with cp.async.bulk.prefetch, which takes no registers
// or shared memory and has no completion to wait for. It reads only weights, so it may run before
// the kernel's programmatic-dependent wait. `p` 16-byte aligned and `bytes` a multiple of 16
// (the host's `L2Prefetch`); sm_90 and newer, elsewhere nothing.
__device__ __forceinline__ void prefetch_l2_share(const unsigned char* p, u64 bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (bytes == 0) return;
    const u64 blocks = (u64)gridDim.x * gridDim.y * gridDim.z;
    const u64 b = blockIdx.x + (u64)gridDim.x * (blockIdx.y + (u64)gridDim.y * blockIdx.z);
    const u64 share = ((bytes + blocks - 1) / blocks + 15) & ~15ull;
    const u64 end = min(bytes, (b + 1) * share);
    constexpr u64 PIECE = 64 * 1024;
    for (u64 at = b * share + threadIdx.x * PIECE; at < end; at += (u64)blockDim.x * PIECE) {
        const unsigned n = (unsigned)min(PIECE, end - at);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + at), "r"(n) : "memory");
    }
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch /* 32 floats */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Maximum over a whole block (as `block_sum`).
__device__ __forceinline__ float block_max(float v, float* scratch /* 32 floats */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// ---- The small-batch products (`gemv.cu`, and `ggml.cu` for GGUF blocks) ----
// How a GEMV's input rows are staged: as given, silu(gate) · up, or rmsnorm(residual + delta).
#define GEMV_PLAIN 0
#define GEMV_SILU 1
#define GEMV_NORM 2
// ... or merged from the decode attention's split-K partials (`merge_splits8`).
#define GEMV_MERGE 3
// The most warps (output rows in flight) per block; `launch::GEMV_WARPS` on the host, which
// launches fewer for small products (`launch::gemv_block_warps`).
#define GEMV_WARPS 16

__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ uint4 float8_to_bf16x8(const float* f) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
}

// Values 8v .. 8v + 7 of row t of the decode attention's output (`k` values: heads of
// `head_dim`), merged from its `splits` split-K partials as `attention_reduce` merges them and
// rounded to bf16 as it writes them: the GEMV_MERGE staging, which saves that kernel's launch and
// its dependent loads on a decode step. A split with no weight (past the context: a graph is
// planned for its bucket's longest) is skipped. `part_out` [t][head][split][head_dim],
// `part_max` and `part_sum` [t][head][split].
__device__ __forceinline__ void merge_splits8(const float* __restrict__ part_out, const float* __restrict__ part_max,
                                              const float* __restrict__ part_sum, u64 t, int v, int k, int splits,
                                              int head_dim, float* f) {
    const int head = (8 * v) / head_dim, d = 8 * v - head * head_dim;
    const u64 th = t * (u64)(k / head_dim) + head;
    const float* maxima = part_max + th * splits;
    const float* sums = part_sum + th * splits;
    float big = -INFINITY;
    for (int s = 0; s < splits; ++s) big = fmaxf(big, maxima[s]);
    float total = 0.0f, value[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int s = 0; s < splits; ++s) {
        const float mx = maxima[s];
        const float weight = mx == -INFINITY ? 0.0f : exp2f(mx - big);
        if (weight == 0.0f) continue;
        total += sums[s] * weight;
        const float4* row = reinterpret_cast<const float4*>(part_out + (th * splits + s) * head_dim + d);
        const float4 a = row[0], b = row[1];
        value[0] += a.x * weight, value[1] += a.y * weight, value[2] += a.z * weight, value[3] += a.w * weight;
        value[4] += b.x * weight, value[5] += b.y * weight, value[6] += b.z * weight, value[7] += b.w * weight;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = total > 0.0f ? value[e] / total : 0.0f;
}

// ---- E4M3 (FP8 weights, `fp8.cu` and `gemv.cu`; the FP8 KV cache, the attention kernels) ----
// The conversions are sm_89 (Ada) and later instructions; the host refuses FP8 before that.

// Four E4M3 values (the bytes of one 32-bit word) to two f16 pairs: bytes 0 and 1 to `lo`, 2 and
// 3 to `hi`, the lower byte in the lower half. E4M3 is exact in f16: one instruction a pair.
__device__ __forceinline__ void e4m3x4_to_half2x2(u32 word, u32& lo, u32& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}"
        : "=r"(lo), "=r"(hi)
        : "r"(word));
#else
    __trap();
#endif
}

// Four E4M3 values (the bytes of one 32-bit word) to float, the lowest byte first.
__device__ __forceinline__ void e4m3x4_to_float(u32 word, float* f) {
    u32 lo, hi;
    e4m3x4_to_half2x2(word, lo, hi);
    const float2 a = __half22float2(*reinterpret_cast<__half2*>(&lo));
    const float2 b = __half22float2(*reinterpret_cast<__half2*>(&hi));
    f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
}

// Two floats to a pair of E4M3 bytes, `lo` in the low byte (the lower address), rounded to
// nearest even and saturated at +-448 (`model::fp8::e4m3_bits` on the host).
__device__ __forceinline__ unsigned short e4m3x2_from_floats(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short r;
    // The first source goes to the upper byte.
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}

// One float as an E4M3 byte.
__device__ __forceinline__ unsigned char e4m3_from_float(float v) { return (unsigned char)(e4m3x2_from_floats(v, 0.0f) & 0xff); }

// The KV cache's element: bf16, or an E4M3 byte in an FP8 cache (`KvCacheDtype::Fp8E4M3`).
template <bool FP8>
struct KvElement {
    typedef __nv_bfloat16 T;
};
template <>
struct KvElement<true> {
    typedef unsigned char T;
};

// WORDS 32-bit words from `p` in the widest loads its alignment allows (16 bytes when WORDS is a
// multiple of 4, else 8 or 4): shared-memory reads that are one instruction, not WORDS.
template <int WORDS>
__device__ __forceinline__ void load_words(u32 (&w)[WORDS], const unsigned char* p) {
    if constexpr (WORDS % 4 == 0) {
#pragma unroll
        for (int i = 0; i < WORDS / 4; i++) {
            const uint4 v = reinterpret_cast<const uint4*>(p)[i];
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    } else if constexpr (WORDS == 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        w[0] = v.x, w[1] = v.y;
    } else {
        static_assert(WORDS == 1, "1, 2 or a multiple of 4 words");
        w[0] = *reinterpret_cast<const u32*>(p);
    }
}

// A cache value stored from a float: bf16, or E4M3 (the FP8 cache, scale 1: `KV_FP8_SCALE`).
__device__ __forceinline__ void store_cache_value(__nv_bfloat16& dst, float v) { dst = __float2bfloat16(v); }
__device__ __forceinline__ void store_cache_value(unsigned char& dst, float v) { dst = e4m3_from_float(v); }

// A bf16 pair to an f16 pair (the attention kernels' queries over an FP8 cache, whose products
// run on f16 operands: exact unless a query passes f16's 65504, far beyond what attention sees).
__device__ __forceinline__ u32 bf16x2_to_half2(u32 v) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
    __half2 h = __float22half2_rn(f);
    return *reinterpret_cast<u32*>(&h);
}

// ROWS x HD E4M3 values (rows SRC_STRIDE bytes apart) to f16 rows (DST_STRIDE halves apart; the
// destination typed bf16 as the tiles it shares code with), THREADS threads, 8 values at a time:
// consecutive threads read consecutive 8 bytes and write consecutive 16, so neither side has a
// bank conflict.
template <int HD, int ROWS, int THREADS, int SRC_STRIDE, int DST_STRIDE>
__device__ __forceinline__ void e4m3_rows_to_half(__nv_bfloat16 (*dst)[DST_STRIDE], const unsigned char (*src)[SRC_STRIDE]) {
    constexpr int CHUNKS = HD / 8;
#pragma unroll 4
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = i % CHUNKS;
        const uint2 w = *reinterpret_cast<const uint2*>(&src[r][c * 8]);
        uint4 h;
        e4m3x4_to_half2x2(w.x, h.x, h.y);
        e4m3x4_to_half2x2(w.y, h.z, h.w);
        *reinterpret_cast<uint4*>(&dst[r][c * 8]) = h;
    }
}

// ---- Tensor-core and asynchronous-copy helpers (the attention kernels) ----

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16-byte asynchronous copy global -> shared; `valid` false fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
// The same copy with an L2 eviction policy (`l2_evict_first_policy`) for data read once.
__device__ __forceinline__ void cp_async_16_hint(u32 dst, const void* src, bool valid, u64 policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0), "l"(policy)
                 : "memory");
}
// An L2 policy under which lines are the first to go: for a stream read once (a decode step's
// keys and values), so that it does not push out what will be read again (weights prefetched
// for the next product, activations).
__device__ __forceinline__ u64 l2_evict_first_policy() {
    u64 policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b for a 16x16 (row-major) by 16x8 (column-major) bf16 product, float32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The same product of f16 operands (the attention kernels over an FP8 cache).
__device__ __forceinline__ void mma_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The attention kernels' product: bf16 operands over a bf16 cache, f16 over an FP8 one.
template <bool F16>
__device__ __forceinline__ void mma_attention(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (F16) {
        mma_f16(c, a, b0, b1);
    } else {
        mma_bf16(c, a, b0, b1);
    }
}

// c += a * b for a 16x32 (row-major) by 32x8 (column-major) int8 product, int32 accumulators.
__device__ __forceinline__ void mma_s8(int (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair in one register, `lo` in the low half (the lower index of a fragment).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// The same as an f16 pair.
__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// `pack_bf16`, or `pack_f16` for the products over an FP8 cache (`mma_attention`).
template <bool F16>
__device__ __forceinline__ u32 pack_attention(float lo, float hi) {
    if constexpr (F16) {
        return pack_f16(lo, hi);
    } else {
        return pack_bf16(lo, hi);
    }
}

// Asks L2 for the 128-byte line holding `p` (no registers, no wait; nothing if it is there).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// RoPE's rotation of one pair (x1, x2) by `angle`, cosine and sine times `magnitude`, stored as
// the QKV buffer (bf16) or the cache (bf16 or E4M3) holds values: `rope_and_cache` and the decode
// attention kernel that fuses it (`paged_attention.cu`) share it, so the two paths round alike.
__device__ __forceinline__ float2 rope_rotation(float x1, float x2, float angle, float magnitude) {
    float s, c;
    sincosf(angle, &s, &c);
    s *= magnitude;
    c *= magnitude;
    return make_float2(x1 * c - x2 * s, x2 * c + x1 * s);
}
template <typename T>
__device__ __forceinline__ void rope_rotate(float x1, float x2, float angle, float magnitude, T& y1, T& y2) {
    const float2 y = rope_rotation(x1, x2, angle, magnitude);
    store_cache_value(y1, y.x);
    store_cache_value(y2, y.y);
}

// Rows of keys of positions p0 .. p0 + ROWS - 1 into `k_dst` and, with PAIR, the same rows of
// values into `v_dst` (rows of HD + pad elements), THREADS threads copying 16 bytes each per
// step; positions at or past `limit` are zero-filled and never read from the cache or the block
// table. `table[i - table_base]` is the sequence's block i: the whole block table in global
// memory (base 0), or a copy of a stretch of it in shared memory starting at block `table_base`.
// The address arithmetic is most of a decode tile's instructions, so it is done once for a key
// and its value, with one division per call: each next row of a thread is STEP positions on.
// With `evict_first`, the copies carry `policy` (`l2_evict_first_policy`).
// The cache's elements are T: bf16, or E4M3 bytes (an FP8 cache, 16 values a copy, copied raw),
// and value rows may have their own stride (V_STRIDE elements; STRIDE by default).
template <int HD, int ROWS, int THREADS, int STRIDE, bool PAIR, int V_STRIDE = STRIDE, typename T = __nv_bfloat16>
__device__ __forceinline__ void copy_cache_rows(T (*k_dst)[STRIDE], T (*v_dst)[V_STRIDE], const T* __restrict__ k_cache,
                                                const T* __restrict__ v_cache, const u32* __restrict__ table,
                                                int p0, int limit, int num_kv_heads, int kv_head, int block_size,
                                                int table_base, bool evict_first = false, u64 policy = 0) {
    constexpr int VEC = 16 / sizeof(T), CHUNKS = HD / VEC, STEP = THREADS / CHUNKS;
    static_assert(ROWS % STEP == 0, "whole rows per step");
    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    // Elements of one cache block (every KV head's rows), and this thread's chunk in its head's rows.
    const u64 block_elems = (u64)num_kv_heads * block_size * HD;
    const u64 head_chunk = (u64)kv_head * block_size * HD + c * VEC;
    int p = p0 + r0, blk = p / block_size - table_base, off = p % block_size;
#pragma unroll
    for (int i = 0; i < ROWS / STEP; i++) {
        const int r = r0 + i * STEP;
        const bool valid = p < limit;
        const u64 at = valid ? (u64)table[blk] * block_elems + head_chunk + (u64)(off * HD) : 0;
        if (evict_first) {
            cp_async_16_hint(smem_addr(&k_dst[r][c * VEC]), k_cache + at, valid, policy);
            if (PAIR) cp_async_16_hint(smem_addr(&v_dst[r][c * VEC]), v_cache + at, valid, policy);
        } else {
            cp_async_16(smem_addr(&k_dst[r][c * VEC]), k_cache + at, valid);
            if (PAIR) cp_async_16(smem_addr(&v_dst[r][c * VEC]), v_cache + at, valid);
        }
        p += STEP, off += STEP;
        while (off >= block_size) off -= block_size, blk++;
    }
}

// `copy_cache_rows` for one cache (keys or values), of bf16 or E4M3 elements.
template <int HD, int ROWS, int THREADS, int STRIDE, typename T>
__device__ __forceinline__ void load_kv_rows(T (*dst)[STRIDE], const T* __restrict__ cache, const u32* __restrict__ table,
                                             int p0, int limit, int num_kv_heads, int kv_head, int block_size,
                                             int table_base = 0) {
    copy_cache_rows<HD, ROWS, THREADS, STRIDE, false, STRIDE, T>(dst, dst, cache, cache, table, p0, limit, num_kv_heads,
                                                                 kv_head, block_size, table_base);
}
