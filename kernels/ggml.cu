// GGUF (ggml) quantized blocks on the device. The stored blocks are copied to the GPU as they
// are; the formats follow `model/gguf/dequant.rs`, the CPU reference, and `type` is ggml's type id
// (`GgmlType`). Two kinds of kernel read them:
//
//  * `dequant_ggml` expands blocks to bf16: at load, for the types and tensors the products do
//    not read quantized, and into tiles for products of more rows than the GEMV takes
//    (`gemm::ggml_linear`). Eight consecutive values of a row per thread (one 16-byte store;
//    neighbouring threads write neighbouring vectors), each group's scales decoded once.
//    With `qk_head_dim` > 0, a Llama Q/K matrix is put back from llama.cpp's interleaved order
//    (within each head, stored row 2i + j is Hugging Face row j * head_dim / 2 + i).
//
//  * `gemv_<type>_<mode>m<MP>`: the small-batch product straight from the blocks of the types
//    kept quantized (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), as llama.cpp's MMVQ does it: the input
//    rows are staged (each GEMV mode of `gemv.cu`) and quantized to int8 with a float scale per 32
//    values, and every 4 weights by 4 inputs are one `dp4a`. See `gemv_ggml_body`.
//
//  * `mmq_<type>_t<TOKENS>`: products of 5 to 64 rows on the int8 tensor cores (llama.cpp's MMQ),
//    the input quantized once by `quantize_q8_mmq`, split products summed by `mmq_reduce`. See
//    `mmq_body`.

#include <cuda_fp16.h>

__device__ __forceinline__ float f16_at(const unsigned char* b, int at) {
    return __half2float(__ushort_as_half((unsigned short)(b[at] | (b[at + 1] << 8))));
}

// ggml's `get_scale_min_k4`.
__device__ __forceinline__ void scale_min_k4(int j, const unsigned char* q, float& sc, float& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Values per block and bytes per block of `type`, or 0 when unsupported.
__device__ __forceinline__ void ggml_block(int type, int& values, int& bytes) {
    switch (type) {
        case 0: values = 1, bytes = 4; break;      // F32
        case 1: values = 1, bytes = 2; break;      // F16
        case 30: values = 1, bytes = 2; break;     // BF16
        case 2: values = 32, bytes = 18; break;    // Q4_0
        case 3: values = 32, bytes = 20; break;    // Q4_1
        case 6: values = 32, bytes = 22; break;    // Q5_0
        case 7: values = 32, bytes = 24; break;    // Q5_1
        case 8: values = 32, bytes = 34; break;    // Q8_0
        case 10: values = 256, bytes = 84; break;  // Q2_K
        case 11: values = 256, bytes = 110; break; // Q3_K
        case 12: values = 256, bytes = 144; break; // Q4_K
        case 13: values = 256, bytes = 176; break; // Q5_K
        case 14: values = 256, bytes = 210; break; // Q6_K
        case 15: values = 256, bytes = 292; break; // Q8_K
        default: values = 0, bytes = 0;
    }
}


// ---- Dequantization ----

// Values `first` .. `first + 7` of the block at `blk` (`first` a multiple of 8 below the block's
// values; never more than one sub-block, so each group decodes its scales once).
__device__ void ggml_group8(int type, const unsigned char* blk, int first, float* v) {
    switch (type) {
        case 2:
        case 3: {  // Q4_0, Q4_1: values j and j + 16 are the nibbles of byte j
            const bool q41 = type == 3;
            const float d = f16_at(blk, 0), m = q41 ? f16_at(blk, 2) : 0.0f;
            const unsigned char* qs = blk + (q41 ? 4 : 2) + (first & 15);
            const int shift = first >= 16 ? 4 : 0;
            for (int e = 0; e < 8; e++) {
                const int q = (qs[e] >> shift) & 0x0F;
                v[e] = q41 ? q * d + m : (q - 8) * d;
            }
            break;
        }
        case 6:
        case 7: {  // Q5_0, Q5_1: bit j of qh is value j's fifth bit
            const bool q51 = type == 7;
            const float d = f16_at(blk, 0), m = q51 ? f16_at(blk, 2) : 0.0f;
            const unsigned char* h = blk + (q51 ? 4 : 2);
            const unsigned qh = h[0] | (h[1] << 8) | (h[2] << 16) | ((unsigned)h[3] << 24);
            const int shift = first >= 16 ? 4 : 0;
            for (int e = 0; e < 8; e++) {
                const int j = first + e;
                const int q = ((h[4 + (j & 15)] >> shift) & 0x0F) | (((qh >> j) & 1) << 4);
                v[e] = q51 ? q * d + m : (q - 16) * d;
            }
            break;
        }
        case 8: {  // Q8_0
            const float d = f16_at(blk, 0);
            for (int e = 0; e < 8; e++) v[e] = (float)(signed char)blk[2 + first + e] * d;
            break;
        }
        case 10: {  // Q2_K: value 128n + 32s + 16h + l is 2 bits (shift 2s) of q[32n + 16h + l]
            const int n = first >> 7, s = (first >> 5) & 3, h = (first >> 4) & 1, l = first & 15;
            const unsigned char sc = blk[8 * n + 2 * s + h];
            const float dl = f16_at(blk, 80) * (sc & 0x0F), ml = f16_at(blk, 82) * (sc >> 4);
            const unsigned char* q = blk + 16 + 32 * n + 16 * h + l;
            for (int e = 0; e < 8; e++) v[e] = dl * ((q[e] >> (2 * s)) & 3) - ml;
            break;
        }
        case 11: {  // Q3_K: as Q2_K, minus 4 where the high-mask bit 4n + s is clear
            const int n = first >> 7, s = (first >> 5) & 3, l = first & 31, is = 8 * n + 2 * s + (l >> 4);
            const unsigned char* packed = blk + 96;
            const int low = is < 8 ? packed[is] & 0x0F : packed[is - 8] >> 4;
            const int high = (packed[8 + is % 4] >> (2 * (is / 4))) & 3;
            const float dl = f16_at(blk, 108) * (float)((low | (high << 4)) - 32);
            const unsigned char mask = 1 << (4 * n + s);
            for (int e = 0; e < 8; e++) {
                const int q2 = (blk[32 + 32 * n + l + e] >> (2 * s)) & 3;
                v[e] = dl * (float)(q2 - ((blk[l + e] & mask) ? 0 : 4));
            }
            break;
        }
        case 12:
        case 13: {  // Q4_K, Q5_K: value 64j + 32h + l is nibble h of q[32j + l] (+ 16 from qh bit 2j + h)
            const bool q5 = type == 13;
            const int j = first >> 6, h = (first >> 5) & 1, l = first & 31;
            float sc, mn;
            scale_min_k4(2 * j + h, blk + 4, sc, mn);
            const float d = f16_at(blk, 0) * sc, m = f16_at(blk, 2) * mn;
            const unsigned char* q = blk + (q5 ? 48 : 16) + 32 * j + l;
            const unsigned char bit = 1 << (2 * j + h);
            for (int e = 0; e < 8; e++) {
                const int high = q5 && (blk[16 + l + e] & bit) ? 16 : 0;
                v[e] = d * (((q[e] >> (4 * h)) & 0x0F) + high) - m;
            }
            break;
        }
        case 14: {  // Q6_K: value 128n + 32t + l from ql[64n + 32(t & 1) + l] nibble t >> 1 and qh bits 2t
            const int n = first >> 7, t = (first >> 5) & 3, l = first & 31;
            const float d = f16_at(blk, 208) * (float)(signed char)blk[192 + 8 * n + (l >> 4) + 2 * t];
            const unsigned char *ql = blk + 64 * n + 32 * (t & 1) + l, *qh = blk + 128 + 32 * n + l;
            for (int e = 0; e < 8; e++) v[e] = d * (float)((((ql[e] >> (4 * (t >> 1))) & 0x0F) | (((qh[e] >> (2 * t)) & 3) << 4)) - 32);
            break;
        }
        case 15: {  // Q8_K
            const float d = __uint_as_float(blk[0] | (blk[1] << 8) | (blk[2] << 16) | ((unsigned)blk[3] << 24));
            for (int e = 0; e < 8; e++) v[e] = d * (float)(signed char)blk[4 + first + e];
            break;
        }
    }
}

// One value of the element types (F32, F16, BF16) at `b`.
__device__ __forceinline__ float ggml_element(int type, const unsigned char* b) {
    switch (type) {
        case 0: return __uint_as_float(b[0] | (b[1] << 8) | (b[2] << 16) | ((unsigned)b[3] << 24));
        case 1: return f16_at(b, 0);
        default: return __uint_as_float((unsigned)(b[0] | (b[1] << 8)) << 16);
    }
}

// ---- The GEMV from blocks (MMVQ) ----
// out[m, n] = x[m, :] · W[n, :] (+ bias) for m ≤ 8, W in ggml blocks, row after row.
//
// Staging (`stage_q8`): each input row is computed as `gemv.cu` stages it (GEMV_PLAIN, _SILU, _NORM or
// _MERGE, rounded to bf16 the same way), then quantized per 32 values to int8 with the scale
// amax / 127, as llama.cpp's q8_1. Shared memory holds, for MP (padded) rows: the int8 rows
// [MP][k], the scales [MP][k/32] and each 32 values' sum [MP][k/32] (of the quantized values,
// times the scale, as q8_1's): the min terms of Q4_0/Q4_1/K-quants use them,
// Σ (d·q − m)·x = d·Σ q·x − m·Σ x. That is k · 1.25 bytes a row, against 2 for `gemv.cu`'s bf16.
//
// Streaming: the row is cut into units; each lane takes one unit at a time (UNROLL units of RPW
// rows loaded before the first use), every 4 weights one dp4a against the int8 input, and a few
// float multiplies by the scales per 32. A unit is a Q4_0/Q4_1/Q8_0 block (32 weights); in a
// K-quant super-block (256 weights) it is 32 bytes of Q4_K/Q5_K quants (64 weights under one
// pair of scales), or for Q6_K 8 positions of each of the four 32-value quarters of a half.
// Blocks of 18, 34 and 210 bytes are only 2-byte aligned: those are read 2 bytes at a time.
//
// Under a programmatic dependent launch the first units' weight loads are issued before the wait.
//
// Tried and dropped (H200, session 22): `gemv.cu`'s weight stream, one row a warp through a
// cp.async ring of 2048-value chunks in shared memory (about 11 KB a warp in flight, units read
// back from the stage): correct, and 50 registers against 93, but at one input row the 8B Q4_K
// products ran 2-19% slower (head 95 against 80 µs) and the step took 2.60 ms against 2.25.
// Blocks of 8 warps instead of 16 (more blocks a multiprocessor) took it to 2.65 ms.

__device__ __forceinline__ float f16_bits(u32 bits) { return __half2float(__ushort_as_half((unsigned short)(bits & 0xFFFF))); }

// 4 bytes at a 2-byte aligned address.
__device__ __forceinline__ u32 ldg_u16x2(const unsigned char* p) {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return (u32)__ldg(h) | ((u32)__ldg(h + 1) << 16);
}

// Where byte `at` of the staged int8 rows lives in shared memory (a region of whole 128 bytes):
// the 16-byte slots are permuted within each 128 bytes (slot s to s ^ ((s / 8) % 8)). The lanes of a warp read one 16-byte slot
// each from units 32 or 64 bytes apart; without the permutation, 8 lanes of a phase would fall on
// 2 or 4 of its 8 bank groups (a 2- or 4-way conflict), with it on all 8.
__device__ __forceinline__ int xq_at(int at) { return (((at >> 4) ^ ((at >> 7) & 7)) << 4) | (at & 15); }

// 16 staged int8 inputs from byte `at` (a multiple of 16), and 8 from a multiple of 8.
__device__ __forceinline__ int4 x16(const signed char* xq, int at) { return *reinterpret_cast<const int4*>(xq + xq_at(at)); }
__device__ __forceinline__ int2 x8(const signed char* xq, int at) { return *reinterpret_cast<const int2*>(xq + xq_at(at)); }

#define NIBBLES 0x0F0F0F0Fu

// Σ of 16 products: the low (or high) nibbles of the 4 words of `q` by 16 int8 inputs.
__device__ __forceinline__ int dot_nibbles(u32 q0, u32 q1, u32 q2, u32 q3, int shift, int4 x) {
    int s = __dp4a((int)((q0 >> shift) & NIBBLES), x.x, 0);
    s = __dp4a((int)((q1 >> shift) & NIBBLES), x.y, s);
    s = __dp4a((int)((q2 >> shift) & NIBBLES), x.z, s);
    return __dp4a((int)((q3 >> shift) & NIBBLES), x.w, s);
}

// The registers of one unit of type TYPE, its loads, and its products with MP staged rows
// (`xq` int8 [MP][k], `xd` scales [MP][k/32], `xs` sums [MP][k/32]) added to acc[MP].
template <int TYPE>
struct GgmlUnit;

// Q4_0 (d, then 16 bytes of nibbles: value j low, j + 16 high; weight d·(q − 8)) and Q4_1 (d, m,
// then the nibbles; weight d·q + m): both are d·Σ q·x + m·Σ x, with m = −8d for Q4_0.
template <bool Q41>
struct GgmlUnitQ4 {
    static constexpr int VALUES = 32, BYTES = Q41 ? 20 : 18, WEIGHTS = 32;
    u32 q[4];
    float d, m;
    __device__ __forceinline__ void load(const unsigned char* row, int u) {
        const unsigned char* b = row + (u64)u * BYTES;
        if constexpr (Q41) {  // 4-byte aligned blocks
            const u32* w = reinterpret_cast<const u32*>(b);
            const u32 head = __ldg(w);
            d = f16_bits(head), m = f16_bits(head >> 16);
#pragma unroll
            for (int i = 0; i < 4; ++i) q[i] = __ldg(w + 1 + i);
        } else {
            d = f16_bits(__ldg(reinterpret_cast<const unsigned short*>(b))), m = -8.0f * d;
#pragma unroll
            for (int i = 0; i < 4; ++i) q[i] = ldg_u16x2(b + 2 + 4 * i);
        }
    }
    __device__ __forceinline__ void zero() { d = m = 0.0f, q[0] = q[1] = q[2] = q[3] = 0; }
    template <int MP>
    __device__ __forceinline__ void dot(int u, const signed char* xq, const float* xd, const float* xs, int k, float* acc) const {
#pragma unroll
        for (int r = 0; r < MP; ++r) {
            const int at = r * k + 32 * u;
            const int s = dot_nibbles(q[0], q[1], q[2], q[3], 0, x16(xq, at)) + dot_nibbles(q[0], q[1], q[2], q[3], 4, x16(xq, at + 16));
            acc[r] += d * xd[at >> 5] * (float)s + m * xs[at >> 5];
        }
    }
};
template <>
struct GgmlUnit<2> : GgmlUnitQ4<false> {};
template <>
struct GgmlUnit<3> : GgmlUnitQ4<true> {};

template <>
struct GgmlUnit<8> {  // Q8_0: d, then 32 int8
    static constexpr int VALUES = 32, BYTES = 34, WEIGHTS = 32;
    u32 q[8];
    float d;
    __device__ __forceinline__ void load(const unsigned char* row, int u) {
        const unsigned char* b = row + (u64)u * BYTES;
        d = f16_bits(__ldg(reinterpret_cast<const unsigned short*>(b)));
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = ldg_u16x2(b + 2 + 4 * i);
    }
    __device__ __forceinline__ void zero() {
        d = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = 0;
    }
    template <int MP>
    __device__ __forceinline__ void dot(int u, const signed char* xq, const float* xd, const float*, int k, float* acc) const {
#pragma unroll
        for (int r = 0; r < MP; ++r) {
            const int at = r * k + 32 * u;
            const int4 a = x16(xq, at), b = x16(xq, at + 16);
            int s = __dp4a((int)q[0], a.x, 0);
            s = __dp4a((int)q[1], a.y, s);
            s = __dp4a((int)q[2], a.z, s);
            s = __dp4a((int)q[3], a.w, s);
            s = __dp4a((int)q[4], b.x, s);
            s = __dp4a((int)q[5], b.y, s);
            s = __dp4a((int)q[6], b.z, s);
            s = __dp4a((int)q[7], b.w, s);
            acc[r] += d * xd[at >> 5] * (float)s;
        }
    }
};

// Q4_K and Q5_K super-blocks: f16 d and dmin, 12 bytes of 6-bit sub-block scales and mins, (Q5_K:
// 32 bytes of fifth bits,) then 128 bytes of nibbles. Unit p (0..3) of a super-block is quant bytes
// 32p .. 32p + 31: the low nibbles are sub-block 2p (values 64p + l), the high ones sub-block
// 2p + 1 (values 64p + 32 + l). The two share one scale byte triple, so a unit of 64 weights
// decodes its header once, and its 32 quant bytes take 8 registers against the header's 4.
template <bool Q5>
struct K5Bits {  // Q5_K's fifth bits of the 32 positions
    uint4 qh[2];
};
template <>
struct K5Bits<false> {};

// ggml's get_scale_min_k4 for sub-block `is` (0..7) of a K-quant super-block whose first 16 bytes
// are `head`: d and dmin in head.x, the 12 scale bytes in head.y, head.z, head.w (sub-block `is`
// reads byte is % 4 of each).
__device__ __forceinline__ void k4_scale_min(const uint4& head, int is, float& sc, float& mn) {
    const int t = is & 3;
    const u32 by = (head.y >> (8 * t)) & 0xFF, bz = (head.z >> (8 * t)) & 0xFF, bw = (head.w >> (8 * t)) & 0xFF;
    if (is < 4) {
        sc = (float)(by & 63), mn = (float)(bz & 63);
    } else {
        sc = (float)((bw & 0x0F) | ((by >> 6) << 4)), mn = (float)((bw >> 4) | ((bz >> 6) << 4));
    }
}

template <bool Q5>
struct GgmlUnitK45 : K5Bits<Q5> {
    static constexpr int VALUES = 256, BYTES = Q5 ? 176 : 144, WEIGHTS = 64;
    uint4 head, qs[2];
    __device__ __forceinline__ void load(const unsigned char* row, int u) {
        const int p = u & 3;
        const unsigned char* b = row + (u64)(u >> 2) * BYTES;
        head = __ldg(reinterpret_cast<const uint4*>(b));
        const uint4* q = reinterpret_cast<const uint4*>(b + (Q5 ? 48 : 16) + 32 * p);
        qs[0] = __ldg(q), qs[1] = __ldg(q + 1);
        if constexpr (Q5) {
            this->qh[0] = __ldg(reinterpret_cast<const uint4*>(b + 16));
            this->qh[1] = __ldg(reinterpret_cast<const uint4*>(b + 32));
        }
    }
    __device__ __forceinline__ void zero() {
        head = qs[0] = qs[1] = make_uint4(0, 0, 0, 0);
        if constexpr (Q5) this->qh[0] = this->qh[1] = make_uint4(0, 0, 0, 0);
    }
    template <int MP>
    __device__ __forceinline__ void dot(int u, const signed char* xq, const float* xd, const float* xs, int k, float* acc) const {
        const int p = u & 3;
        const float d = f16_bits(head.x), dmin = f16_bits(head.x >> 16);
        float sc[2], mn[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) k4_scale_min(head, 2 * p + e, sc[e], mn[e]);
        const u32 w[8] = {qs[0].x, qs[0].y, qs[0].z, qs[0].w, qs[1].x, qs[1].y, qs[1].z, qs[1].w};
        u32 lo[8], hi[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) lo[i] = w[i] & NIBBLES, hi[i] = (w[i] >> 4) & NIBBLES;
        if constexpr (Q5) {
            const u32 h[8] = {this->qh[0].x, this->qh[0].y, this->qh[0].z, this->qh[0].w, this->qh[1].x, this->qh[1].y, this->qh[1].z, this->qh[1].w};
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                lo[i] |= ((h[i] >> (2 * p)) & 0x01010101u) << 4;
                hi[i] |= ((h[i] >> (2 * p + 1)) & 0x01010101u) << 4;
            }
        }
        const float dl = d * sc[0], dh = d * sc[1], ml = dmin * mn[0], mh = dmin * mn[1];
#pragma unroll
        for (int r = 0; r < MP; ++r) {
            const int at = r * k + (u >> 2) * 256 + 64 * p;  // the low nibbles' inputs; the high ones' at + 32
            const int4 a0 = x16(xq, at), a1 = x16(xq, at + 16), b0 = x16(xq, at + 32), b1 = x16(xq, at + 48);
            int s_lo = __dp4a((int)lo[0], a0.x, 0), s_hi = __dp4a((int)hi[0], b0.x, 0);
            s_lo = __dp4a((int)lo[1], a0.y, s_lo), s_hi = __dp4a((int)hi[1], b0.y, s_hi);
            s_lo = __dp4a((int)lo[2], a0.z, s_lo), s_hi = __dp4a((int)hi[2], b0.z, s_hi);
            s_lo = __dp4a((int)lo[3], a0.w, s_lo), s_hi = __dp4a((int)hi[3], b0.w, s_hi);
            s_lo = __dp4a((int)lo[4], a1.x, s_lo), s_hi = __dp4a((int)hi[4], b1.x, s_hi);
            s_lo = __dp4a((int)lo[5], a1.y, s_lo), s_hi = __dp4a((int)hi[5], b1.y, s_hi);
            s_lo = __dp4a((int)lo[6], a1.z, s_lo), s_hi = __dp4a((int)hi[6], b1.z, s_hi);
            s_lo = __dp4a((int)lo[7], a1.w, s_lo), s_hi = __dp4a((int)hi[7], b1.w, s_hi);
            const int g = at >> 5;
            acc[r] += dl * xd[g] * (float)s_lo + dh * xd[g + 1] * (float)s_hi - ml * xs[g] - mh * xs[g + 1];
        }
    }
};
template <>
struct GgmlUnit<12> : GgmlUnitK45<false> {};
template <>
struct GgmlUnit<13> : GgmlUnitK45<true> {};

// Q6_K super-blocks: ql[128] (low 4 bits), qh[64] (high 2 bits), 16 int8 scales, f16 d. Value
// 128n + 32t + l is nibble t / 2 of ql[64n + 32(t % 2) + l] with bits 2t of qh[32n + l], minus 32,
// times d · scale[8n + l / 16 + 2t]. Unit c (0..7) is n = c / 4 and l = 8(c % 4) .. + 7 of every t:
// 32 weights under four input scales.
template <>
struct GgmlUnit<14> {
    static constexpr int VALUES = 256, BYTES = 210, WEIGHTS = 32;
    u32 ql0[2], ql1[2], qh[2], sc[2];
    float d;
    __device__ __forceinline__ void load(const unsigned char* row, int u) {
        const int c = u & 7, n = c >> 2, l = 8 * (c & 3);
        const unsigned char* b = row + (u64)(u >> 3) * BYTES;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            ql0[i] = ldg_u16x2(b + 64 * n + l + 4 * i);
            ql1[i] = ldg_u16x2(b + 64 * n + 32 + l + 4 * i);
            qh[i] = ldg_u16x2(b + 128 + 32 * n + l + 4 * i);
            sc[i] = ldg_u16x2(b + 192 + 8 * n + 4 * i);  // scales 8n .. 8n + 7
        }
        d = f16_bits(__ldg(reinterpret_cast<const unsigned short*>(b + 208)));
    }
    __device__ __forceinline__ void zero() {
        d = 0.0f;
        ql0[0] = ql0[1] = ql1[0] = ql1[1] = qh[0] = qh[1] = sc[0] = sc[1] = 0;
    }
    template <int MP>
    __device__ __forceinline__ void dot(int u, const signed char* xq, const float* xd, const float*, int k, float* acc) const {
        const int c = u & 7, n = c >> 2, l = 8 * (c & 3);
        int q[4][2];
        float scale[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const u32 low = ((t & 1 ? ql1[i] : ql0[i]) >> (4 * (t >> 1))) & NIBBLES;
                q[t][i] = (int)__vsub4(low | (((qh[i] >> (2 * t)) & 0x03030303u) << 4), 0x20202020u);
            }
            // scale[8n + l / 16 + 2t]: byte l / 16 + 2 (t % 2) of word t / 2.
            scale[t] = d * (float)(signed char)((sc[t >> 1] >> (8 * ((l >> 4) + 2 * (t & 1)))) & 0xFF);
        }
#pragma unroll
        for (int r = 0; r < MP; ++r) {
            const int base = r * k + (u >> 3) * 256 + 128 * n;
            float sum = 0.0f;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const int2 x = x8(xq, base + 32 * t + l);
                const int s = __dp4a(q[t][1], x.y, __dp4a(q[t][0], x.x, 0));
                sum += scale[t] * xd[(base >> 5) + t] * (float)s;
            }
            acc[r] += sum;
        }
    }
};

// ---- Dequantization, in words (after the units: it reads their layouts) ----

// Values `first` .. `first + 7` of the TYPE block at `blk`, as `ggml_group8` gives them, for the
// types the products keep quantized: each block's bytes read in words as wide as its alignment
// allows (the blocks of 18, 34 and 210 bytes are only 2-byte aligned, Q4_1's 4-byte, the K-quants'
// 16-byte), the scales once. `ggml_group8` reads a byte at a time, which left its tiles at about
// a tenth of the copy rate.
template <int TYPE>
__device__ __forceinline__ void group8_words(const unsigned char* __restrict__ blk, int first, float* v);

template <>
__device__ __forceinline__ void group8_words<2>(const unsigned char* __restrict__ blk, int first, float* v) {  // Q4_0
    const float d = f16_bits(__ldg(reinterpret_cast<const unsigned short*>(blk)));
    const u32 w[2] = {ldg_u16x2(blk + 2 + (first & 15)), ldg_u16x2(blk + 6 + (first & 15))};
    const int shift = first >= 16 ? 4 : 0;
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = (float)((int)((w[e >> 2] >> (8 * (e & 3) + shift)) & 0x0F) - 8) * d;
}

template <>
__device__ __forceinline__ void group8_words<3>(const unsigned char* __restrict__ blk, int first, float* v) {  // Q4_1
    const u32* b = reinterpret_cast<const u32*>(blk);
    const u32 head = __ldg(b);
    const float d = f16_bits(head), m = f16_bits(head >> 16);
    const u32 w[2] = {__ldg(b + 1 + ((first & 15) >> 2)), __ldg(b + 2 + ((first & 15) >> 2))};
    const int shift = first >= 16 ? 4 : 0;
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = (float)((w[e >> 2] >> (8 * (e & 3) + shift)) & 0x0F) * d + m;
}

template <>
__device__ __forceinline__ void group8_words<8>(const unsigned char* __restrict__ blk, int first, float* v) {  // Q8_0
    const float d = f16_bits(__ldg(reinterpret_cast<const unsigned short*>(blk)));
    const u32 w[2] = {ldg_u16x2(blk + 2 + first), ldg_u16x2(blk + 6 + first)};
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = (float)(signed char)((w[e >> 2] >> (8 * (e & 3))) & 0xFF) * d;
}

template <int TYPE>
__device__ __forceinline__ void group8_words_k45(const unsigned char* __restrict__ blk, int first, float* v) {  // Q4_K, Q5_K
    constexpr bool q5 = TYPE == 13;
    const int j = first >> 6, h = (first >> 5) & 1, l = first & 31;
    const uint4 head = __ldg(reinterpret_cast<const uint4*>(blk));
    float sc, mn;
    k4_scale_min(head, 2 * j + h, sc, mn);
    const float d = f16_bits(head.x) * sc, m = f16_bits(head.x >> 16) * mn;
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(blk + (q5 ? 48 : 16) + 32 * j + l));
    const u32 w[2] = {(q.x >> (4 * h)) & NIBBLES, (q.y >> (4 * h)) & NIBBLES};
    u32 high[2] = {0, 0};
    if constexpr (q5) {
        const uint2 qh = __ldg(reinterpret_cast<const uint2*>(blk + 16 + l));
        high[0] = ((qh.x >> (2 * j + h)) & 0x01010101u) << 4, high[1] = ((qh.y >> (2 * j + h)) & 0x01010101u) << 4;
    }
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = d * (float)(((w[e >> 2] | high[e >> 2]) >> (8 * (e & 3))) & 0xFF) - m;
}
template <>
__device__ __forceinline__ void group8_words<12>(const unsigned char* __restrict__ blk, int first, float* v) { group8_words_k45<12>(blk, first, v); }
template <>
__device__ __forceinline__ void group8_words<13>(const unsigned char* __restrict__ blk, int first, float* v) { group8_words_k45<13>(blk, first, v); }

template <>
__device__ __forceinline__ void group8_words<14>(const unsigned char* __restrict__ blk, int first, float* v) {  // Q6_K
    const int n = first >> 7, t = (first >> 5) & 3, l = first & 31;
    const float d = f16_bits(__ldg(reinterpret_cast<const unsigned short*>(blk + 208))) * (float)(signed char)__ldg(blk + 192 + 8 * n + (l >> 4) + 2 * t);
    const unsigned char *ql = blk + 64 * n + 32 * (t & 1) + l, *qh = blk + 128 + 32 * n + l;
    const u32 low[2] = {ldg_u16x2(ql), ldg_u16x2(ql + 4)}, high[2] = {ldg_u16x2(qh), ldg_u16x2(qh + 4)};
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u32 q = ((low[i] >> (4 * (t >> 1))) & NIBBLES) | (((high[i] >> (2 * t)) & 0x03030303u) << 4);
#pragma unroll
        for (int e = 0; e < 4; e++) v[4 * i + e] = d * (float)((int)((q >> (8 * e)) & 0xFF) - 32);
    }
}

// Row `row` of a Llama Q/K matrix stored in llama.cpp's interleaved order goes to this row (see
// the header); every row stays where it is without `qk_head_dim`.
__device__ __forceinline__ u32 unpermuted_row(u32 row, int qk_head_dim) {
    if (qk_head_dim <= 0) return row;
    const u32 head = row / qk_head_dim, w = row % qk_head_dim;
    return head * qk_head_dim + (w & 1) * (qk_head_dim / 2) + (w >> 1);
}

// `dequant_ggml` for one of the types the products keep quantized, `total` (rows · cols / 8)
// below 2^32, so the index arithmetic is 32-bit.
template <int TYPE>
__device__ __forceinline__ void dequant_words(__nv_bfloat16* __restrict__ out, const unsigned char* __restrict__ in, u32 rows, u32 cols,
                                              int qk_head_dim) {
    using Unit = GgmlUnit<TYPE>;
    const u32 groups = cols / 8, total = rows * groups, blocks_per_row = cols / Unit::VALUES;
    for (u32 g = blockIdx.x * blockDim.x + threadIdx.x; g < total; g += gridDim.x * blockDim.x) {
        const u32 row = g / groups, c0 = (g - row * groups) * 8;
        float v[8];
        group8_words<TYPE>(in + ((u64)row * blocks_per_row + c0 / Unit::VALUES) * Unit::BYTES, c0 % Unit::VALUES, v);
        *reinterpret_cast<uint4*>(out + (u64)unpermuted_row(row, qk_head_dim) * cols + c0) = float8_to_bf16x8(v);
    }
}

// `rows` rows of `cols` values (cols a multiple of the type's block) from `in` into `out` (16-byte
// aligned); eight values per thread, grid-stride. The blocks start where their type's alignment
// puts them (`in` and each row at a multiple of the block's alignment, as a row of whole blocks
// after a 256-byte aligned start is).
extern "C" __global__ void dequant_ggml(__nv_bfloat16* __restrict__ out, const unsigned char* __restrict__ in,
                                        int type, int rows, int cols, int qk_head_dim) {
    PDL_ENTER();
    int values, bytes;
    ggml_block(type, values, bytes);
    if (values == 0) return;
    const int groups = (cols + 7) / 8;
    const u64 total = (u64)rows * groups;
    if (total < 0xFFFFFFFFull) {
        switch (type) {
            case 2: dequant_words<2>(out, in, rows, cols, qk_head_dim); return;
            case 3: dequant_words<3>(out, in, rows, cols, qk_head_dim); return;
            case 8: dequant_words<8>(out, in, rows, cols, qk_head_dim); return;
            case 12: dequant_words<12>(out, in, rows, cols, qk_head_dim); return;
            case 13: dequant_words<13>(out, in, rows, cols, qk_head_dim); return;
            case 14: dequant_words<14>(out, in, rows, cols, qk_head_dim); return;
            default: break;
        }
    }
    for (u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += (u64)gridDim.x * blockDim.x) {
        const int row = (int)(g / groups), c0 = (int)(g % groups) * 8;
        float v[8];
        __nv_bfloat16* y = out + (u64)unpermuted_row(row, qk_head_dim) * cols + c0;
        if (values == 1) {
            // Element types: any width; the last group of a row may be short.
            const int count = min(8, cols - c0);
            for (int e = 0; e < count; e++) y[e] = __float2bfloat16(ggml_element(type, in + ((u64)row * cols + c0 + e) * bytes));
            continue;
        }
        ggml_group8(type, in + ((u64)row * (cols / values) + c0 / values) * bytes, c0 % values, v);
        *reinterpret_cast<uint4*>(y) = float8_to_bf16x8(v);
    }
}

// 8 values `f` of a 32-value group held by 4 neighbouring lanes, quantized as llama.cpp's q8_1:
// int8 `packed` (the lowest byte first) with the group's scale d = amax / 127, and s = d · (the
// group's sum of quantized values). Every lane of the warp must call it (shuffles).
__device__ __forceinline__ void quantize_q8_group(const float (&f)[8], u32 (&packed)[2], float& d, float& s) {
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(f[e]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const float inv_d = amax > 0.0f ? 127.0f / amax : 0.0f;
    packed[0] = packed[1] = 0;
    int sum = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int q = __float2int_rn(f[e] * inv_d);
        sum += q;
        packed[e >> 2] |= (u32)(q & 0xFF) << (8 * (e & 3));
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    d = amax / 127.0f, s = (float)sum * d;
}

// Stages the M input rows as int8 per 32 (see above) with the whole block; the caller
// synchronizes after. `inv_rms` is MP floats of shared memory.
template <int MODE, int MP>
__device__ __forceinline__ void stage_q8(signed char* xq, float* xd, float* xs, const void* __restrict__ x,
                                         const __nv_bfloat16* __restrict__ delta, const float* __restrict__ norm_w,
                                         float* __restrict__ residual_out, const u32* __restrict__ rows, int m, int k,
                                         float eps, float* scratch, float* inv_rms, int splits, int head_dim) {
    if (MODE == GEMV_NORM) {
        // Each row's rms first (a block reduction per row), as `gemv.cu`'s staging.
        for (int r = 0; r < m; ++r) {
            const u64 src = rows != nullptr ? (u64)rows[r] : (u64)r;
            const float4* xr = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + src * k);
            const __nv_bfloat162* dr = delta != nullptr ? reinterpret_cast<const __nv_bfloat162*>(delta + src * k) : nullptr;
            float sum_sq = 0.0f;
            for (int q = threadIdx.x; q < (k >> 2); q += blockDim.x) {
                float4 v = xr[q];
                if (dr != nullptr) {
                    const float2 d0 = __bfloat1622float2(dr[2 * q]), d1 = __bfloat1622float2(dr[2 * q + 1]);
                    v.x += d0.x, v.y += d0.y, v.z += d1.x, v.w += d1.y;
                }
                sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            const float inv = rsqrtf(block_sum(sum_sq, scratch) / k + eps);
            if (threadIdx.x == 0) inv_rms[r] = inv;
        }
        __syncthreads();
    }
    // Thread i takes 8 values (vector i of the [MP][k] rows); a 32-value group is 4 neighbouring
    // lanes, which share its maximum by shuffles. The loop bound is the same for the whole block,
    // so every lane reaches every shuffle.
    const int kv = k >> 3, vecs = MP * kv;
    for (int base = 0; base < vecs; base += blockDim.x) {
        const int i = base + threadIdx.x, r = i / kv, v = i - r * kv;
        float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (i < vecs && r < m) {
            uint4 staged;
            if (MODE == GEMV_PLAIN) {
                staged = reinterpret_cast<const uint4*>(x)[(u64)r * kv + v];
            } else if (MODE == GEMV_MERGE) {
                float merged[8];
                merge_splits8(reinterpret_cast<const float*>(x), norm_w, residual_out, r, v, k, splits, head_dim, merged);
                staged = float8_to_bf16x8(merged);
            } else if (MODE == GEMV_SILU) {
                const uint4* gate_up = reinterpret_cast<const uint4*>(x);
                float g[8], up[8], a[8];
                bf16x8_to_float(gate_up[(u64)r * 2 * kv + v], g);
                bf16x8_to_float(gate_up[(u64)r * 2 * kv + kv + v], up);
#pragma unroll
                for (int e = 0; e < 8; ++e) a[e] = g[e] / (1.0f + __expf(-g[e])) * up[e];
                staged = float8_to_bf16x8(a);
            } else {
                const u64 src = rows != nullptr ? (u64)rows[r] : (u64)r;
                const float4* xr = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + src * k) + 2 * v;
                float4 p0 = xr[0], p1 = xr[1];
                if (delta != nullptr) {
                    const __nv_bfloat162* dr = reinterpret_cast<const __nv_bfloat162*>(delta + src * k) + 4 * v;
                    const float2 d0 = __bfloat1622float2(dr[0]), d1 = __bfloat1622float2(dr[1]);
                    const float2 d2 = __bfloat1622float2(dr[2]), d3 = __bfloat1622float2(dr[3]);
                    p0.x += d0.x, p0.y += d0.y, p0.z += d1.x, p0.w += d1.y;
                    p1.x += d2.x, p1.y += d2.y, p1.z += d3.x, p1.w += d3.y;
                }
                if (residual_out != nullptr && blockIdx.x == 0) {
                    float4* keep = reinterpret_cast<float4*>(residual_out + src * k) + 2 * v;
                    keep[0] = p0, keep[1] = p1;
                }
                const float4 w0 = reinterpret_cast<const float4*>(norm_w)[2 * v], w1 = reinterpret_cast<const float4*>(norm_w)[2 * v + 1];
                const float inv = inv_rms[r];
                const float a[8] = {w0.x * (p0.x * inv), w0.y * (p0.y * inv), w0.z * (p0.z * inv), w0.w * (p0.w * inv),
                                    w1.x * (p1.x * inv), w1.y * (p1.y * inv), w1.z * (p1.z * inv), w1.w * (p1.w * inv)};
                staged = float8_to_bf16x8(a);
            }
            bf16x8_to_float(staged, f);
        }
        u32 packed[2];
        float d, s;
        quantize_q8_group(f, packed, d, s);
        if (i < vecs) {
            *reinterpret_cast<uint2*>(xq + xq_at(8 * i)) = make_uint2(packed[0], packed[1]);
            if ((i & 3) == 0) xd[i >> 2] = d, xs[i >> 2] = s;
        }
    }
}

// RPW_FORCE 1: one row a warp at one input row (`_r1` kernels, Q4_K), with as many units in flight
// a lane as two rows have; the host takes it where two rows a warp would leave most of a last
// round of warps idle (the 8B QKV: 3,072 row pairs on 2,112 warps are 1.45 rounds, 6,144 rows 2.9).
template <int TYPE, int MODE, int MP, int RPW_FORCE = 0>
__device__ __forceinline__ void gemv_ggml_body(void* __restrict__ out, int out_f32, const void* __restrict__ x,
                                               const __nv_bfloat16* __restrict__ delta, const float* __restrict__ norm_w,
                                               float* __restrict__ residual_out, const u32* __restrict__ rows,
                                               const float* __restrict__ bias, const void* __restrict__ w_raw, int m, int n,
                                               int k, float eps, int splits, int head_dim) {
    using Unit = GgmlUnit<TYPE>;
    // Units in flight per lane (UNROLL for each of RPW rows): as many bytes as the registers hold
    // without spilling (ptxas -v at the 128 registers of 512 threads). Q4_K's 64-weight units are
    // 12 registers, Q5_K's 20. Two rows a warp: a one-wave grid of 16-warp blocks then covers the
    // 8B shape's 4096-row products at once (three rows left a third of the warps idle there:
    // a Q4_K step took 2.73 ms against 2.60, H200). With eight input rows the accumulators and
    // inputs leave room for one K-quant unit of one row, and with four for one unit of two Q4_K rows
    // or of one Q5_K row (more spilled: the Q4_K step at four rows took 5.12 ms against 4.95 at eight).
    constexpr bool kq = TYPE == 12 || TYPE == 13;
    constexpr int RPW = RPW_FORCE > 0 ? RPW_FORCE : kq && (MP == 8 || (MP == 4 && TYPE == 13)) ? 1 : 2;
    constexpr int UNROLL = RPW_FORCE == 1 && kq && MP == 1 ? 4
                           : kq ? (MP == 1 || (MP == 2 && TYPE == 12) ? 2 : 1) : MP <= 2 ? (sizeof(Unit) <= 36 ? 4 : 2) : 2;
    extern __shared__ __align__(16) unsigned char ggml_smem[];
    __shared__ float scratch[32];
    __shared__ float inv_rms[MP];
    signed char* xq = reinterpret_cast<signed char*>(ggml_smem);           // [MP][k]
    // [MP][k / 32] after the int8 rows, which take whole 128 bytes (`xq_at` permutes within them).
    float* xd = reinterpret_cast<float*>(ggml_smem + (((size_t)MP * k + 127) & ~(size_t)127));
    float* xs = xd + MP * (k >> 5);                                        // [MP][k / 32]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int units = k / Unit::WEIGHTS;
    const u64 row_bytes = (u64)(k / Unit::VALUES) * Unit::BYTES;
    const unsigned char* w = reinterpret_cast<const unsigned char*>(w_raw);
    const int first_row = (blockIdx.x * warps + warp) * RPW;

    Unit wu[RPW][UNROLL];
    auto load = [&](int row0, int base) {
#pragma unroll
        for (int q = 0; q < RPW; ++q)
#pragma unroll
            for (int j = 0; j < UNROLL; ++j) {
                const int u = base + 32 * j + lane;
                if (row0 + q < n && u < units) wu[q][j].load(w + (u64)(row0 + q) * row_bytes, u);
                else wu[q][j].zero();
            }
    };
    // A warp's chunks, in order: 32·UNROLL units of RPW rows, along the rows, then the next rows.
    // Each chunk's loads wait a DRAM round trip before its products can start, and a warp has
    // nothing else in flight meanwhile (gate_up at one input row takes 7 chunks a warp, down 4).
    // So while a chunk's loads are in flight, the next chunk's lines are asked into L2 (no
    // registers held): its loads then wait only for L2. Only the next: asking for two or three
    // chunks ahead (up to 29 MB across the GPU) made the 8B Q4_K step at one row 2.55 and 2.63 ms
    // against 2.45, the lines crowded out of L2 before their loads came.
    const int row_step = gridDim.x * warps * RPW;
    constexpr int UNITS_PER_BLOCK = Unit::VALUES / Unit::WEIGHTS;
    auto prefetch_next = [&](int row0, int base) {
        base += 32 * UNROLL;
        if (base >= units) base = 0, row0 += row_step;
        const u64 first = (u64)(base / UNITS_PER_BLOCK) * Unit::BYTES;
        const u64 last = (u64)((min(base + 32 * UNROLL, units) + UNITS_PER_BLOCK - 1) / UNITS_PER_BLOCK) * Unit::BYTES;
#pragma unroll
        for (int q = 0; q < RPW; ++q) {
            if (row0 + q >= n) break;
            // Whole 128-byte lines, from the one holding the chunk's first byte to the one holding
            // its last: never outside the matrix's allocation (each its own, 256-byte aligned).
            const u64 row = reinterpret_cast<u64>(w) + (u64)(row0 + q) * row_bytes;
            for (u64 line = ((row + first) & ~(u64)127) + 128 * lane; line < row + last; line += 32 * 128)
                prefetch_l2(reinterpret_cast<const void*>(line));
        }
    };
    // Weights are never written by a kernel: the first loads may precede the wait.
    load(first_row, 0);
    prefetch_next(first_row, 0);
    pdl_wait();
    pdl_trigger();
    stage_q8<MODE, MP>(xq, xd, xs, x, delta, norm_w, residual_out, rows, m, k, eps, scratch, inv_rms, splits, head_dim);
    __syncthreads();

    bool first_chunk = true;
    for (int row0 = first_row; row0 < n; row0 += row_step) {
        float acc[RPW][MP];
#pragma unroll
        for (int q = 0; q < RPW; ++q)
#pragma unroll
            for (int r = 0; r < MP; ++r) acc[q][r] = 0.0f;
        for (int base = 0; base < units; base += 32 * UNROLL) {
            if (first_chunk) {
                first_chunk = false;
            } else {
                load(row0, base);
                prefetch_next(row0, base);
            }
#pragma unroll
            for (int j = 0; j < UNROLL; ++j) {
                const int u = base + 32 * j + lane;
                if (u < units) {
#pragma unroll
                    for (int q = 0; q < RPW; ++q) wu[q][j].template dot<MP>(u, xq, xd, xs, k, acc[q]);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < RPW; ++q)
#pragma unroll
            for (int r = 0; r < MP; ++r) acc[q][r] = warp_sum(acc[q][r]);
        if (lane == 0) {
#pragma unroll
            for (int q = 0; q < RPW; ++q) {
                const int row = row0 + q;
                if (row >= n) break;
                const float b = bias != nullptr ? bias[row] : 0.0f;
#pragma unroll
                for (int r = 0; r < MP; ++r) {
                    if (r < m) {
                        const u64 at = (u64)r * n + row;
                        if (out_f32) reinterpret_cast<float*>(out)[at] = acc[q][r] + b;
                        else reinterpret_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16(acc[q][r] + b);
                    }
                }
            }
        }
    }
}

// The signature of every GEMV (`gemv.cu`); `w_scale` is unused here.
#define GEMV_GGML_KERNEL(NAME, TYPE, MODE, MP)                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                    \
        NAME(void* out, int out_f32, const void* x, const __nv_bfloat16* delta, const float* norm_w,                 \
             float* residual_out, const u32* rows, const float* bias, const void* w, const float* w_scale, int m,    \
             int n, int k, float eps, int splits, int head_dim) {                                                    \
        gemv_ggml_body<TYPE, MODE, MP>(out, out_f32, x, delta, norm_w, residual_out, rows, bias, w, m, n, k, eps,    \
                                       splits, head_dim);                                                            \
    }

GEMV_GGML_KERNEL(gemv_q4_0_m1, 2, GEMV_PLAIN, 1)
GEMV_GGML_KERNEL(gemv_q4_0_m2, 2, GEMV_PLAIN, 2)
GEMV_GGML_KERNEL(gemv_q4_0_m4, 2, GEMV_PLAIN, 4)
GEMV_GGML_KERNEL(gemv_q4_0_m8, 2, GEMV_PLAIN, 8)
GEMV_GGML_KERNEL(gemv_q4_0_silu_m1, 2, GEMV_SILU, 1)
GEMV_GGML_KERNEL(gemv_q4_0_silu_m2, 2, GEMV_SILU, 2)
GEMV_GGML_KERNEL(gemv_q4_0_silu_m4, 2, GEMV_SILU, 4)
GEMV_GGML_KERNEL(gemv_q4_0_silu_m8, 2, GEMV_SILU, 8)
GEMV_GGML_KERNEL(gemv_q4_0_norm_m1, 2, GEMV_NORM, 1)
GEMV_GGML_KERNEL(gemv_q4_0_norm_m2, 2, GEMV_NORM, 2)
GEMV_GGML_KERNEL(gemv_q4_0_norm_m4, 2, GEMV_NORM, 4)
GEMV_GGML_KERNEL(gemv_q4_0_norm_m8, 2, GEMV_NORM, 8)
GEMV_GGML_KERNEL(gemv_q4_0_merge_m1, 2, GEMV_MERGE, 1)
GEMV_GGML_KERNEL(gemv_q4_1_m1, 3, GEMV_PLAIN, 1)
GEMV_GGML_KERNEL(gemv_q4_1_m2, 3, GEMV_PLAIN, 2)
GEMV_GGML_KERNEL(gemv_q4_1_m4, 3, GEMV_PLAIN, 4)
GEMV_GGML_KERNEL(gemv_q4_1_m8, 3, GEMV_PLAIN, 8)
GEMV_GGML_KERNEL(gemv_q4_1_silu_m1, 3, GEMV_SILU, 1)
GEMV_GGML_KERNEL(gemv_q4_1_silu_m2, 3, GEMV_SILU, 2)
GEMV_GGML_KERNEL(gemv_q4_1_silu_m4, 3, GEMV_SILU, 4)
GEMV_GGML_KERNEL(gemv_q4_1_silu_m8, 3, GEMV_SILU, 8)
GEMV_GGML_KERNEL(gemv_q4_1_norm_m1, 3, GEMV_NORM, 1)
GEMV_GGML_KERNEL(gemv_q4_1_norm_m2, 3, GEMV_NORM, 2)
GEMV_GGML_KERNEL(gemv_q4_1_norm_m4, 3, GEMV_NORM, 4)
GEMV_GGML_KERNEL(gemv_q4_1_norm_m8, 3, GEMV_NORM, 8)
GEMV_GGML_KERNEL(gemv_q4_1_merge_m1, 3, GEMV_MERGE, 1)
GEMV_GGML_KERNEL(gemv_q8_0_m1, 8, GEMV_PLAIN, 1)
GEMV_GGML_KERNEL(gemv_q8_0_m2, 8, GEMV_PLAIN, 2)
GEMV_GGML_KERNEL(gemv_q8_0_m4, 8, GEMV_PLAIN, 4)
GEMV_GGML_KERNEL(gemv_q8_0_m8, 8, GEMV_PLAIN, 8)
GEMV_GGML_KERNEL(gemv_q8_0_silu_m1, 8, GEMV_SILU, 1)
GEMV_GGML_KERNEL(gemv_q8_0_silu_m2, 8, GEMV_SILU, 2)
GEMV_GGML_KERNEL(gemv_q8_0_silu_m4, 8, GEMV_SILU, 4)
GEMV_GGML_KERNEL(gemv_q8_0_silu_m8, 8, GEMV_SILU, 8)
GEMV_GGML_KERNEL(gemv_q8_0_norm_m1, 8, GEMV_NORM, 1)
GEMV_GGML_KERNEL(gemv_q8_0_norm_m2, 8, GEMV_NORM, 2)
GEMV_GGML_KERNEL(gemv_q8_0_norm_m4, 8, GEMV_NORM, 4)
GEMV_GGML_KERNEL(gemv_q8_0_norm_m8, 8, GEMV_NORM, 8)
GEMV_GGML_KERNEL(gemv_q8_0_merge_m1, 8, GEMV_MERGE, 1)
GEMV_GGML_KERNEL(gemv_q4_k_m1, 12, GEMV_PLAIN, 1)
GEMV_GGML_KERNEL(gemv_q4_k_m2, 12, GEMV_PLAIN, 2)
GEMV_GGML_KERNEL(gemv_q4_k_m4, 12, GEMV_PLAIN, 4)
GEMV_GGML_KERNEL(gemv_q4_k_m8, 12, GEMV_PLAIN, 8)
GEMV_GGML_KERNEL(gemv_q4_k_silu_m1, 12, GEMV_SILU, 1)
GEMV_GGML_KERNEL(gemv_q4_k_silu_m2, 12, GEMV_SILU, 2)
GEMV_GGML_KERNEL(gemv_q4_k_silu_m4, 12, GEMV_SILU, 4)
GEMV_GGML_KERNEL(gemv_q4_k_silu_m8, 12, GEMV_SILU, 8)
GEMV_GGML_KERNEL(gemv_q4_k_norm_m1, 12, GEMV_NORM, 1)
GEMV_GGML_KERNEL(gemv_q4_k_norm_m2, 12, GEMV_NORM, 2)
GEMV_GGML_KERNEL(gemv_q4_k_norm_m4, 12, GEMV_NORM, 4)
GEMV_GGML_KERNEL(gemv_q4_k_norm_m8, 12, GEMV_NORM, 8)
GEMV_GGML_KERNEL(gemv_q4_k_merge_m1, 12, GEMV_MERGE, 1)
#define GEMV_GGML_KERNEL_R1(NAME, TYPE, MODE)                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                    \
        NAME(void* out, int out_f32, const void* x, const __nv_bfloat16* delta, const float* norm_w,                 \
             float* residual_out, const u32* rows, const float* bias, const void* w, const float* w_scale, int m,    \
             int n, int k, float eps, int splits, int head_dim) {                                                    \
        gemv_ggml_body<TYPE, MODE, 1, 1>(out, out_f32, x, delta, norm_w, residual_out, rows, bias, w, m, n, k, eps,  \
                                         splits, head_dim);                                                          \
    }
GEMV_GGML_KERNEL_R1(gemv_q4_k_m1_r1, 12, GEMV_PLAIN)
GEMV_GGML_KERNEL_R1(gemv_q4_k_silu_m1_r1, 12, GEMV_SILU)
GEMV_GGML_KERNEL_R1(gemv_q4_k_norm_m1_r1, 12, GEMV_NORM)
GEMV_GGML_KERNEL(gemv_q5_k_m1, 13, GEMV_PLAIN, 1)
GEMV_GGML_KERNEL(gemv_q5_k_m2, 13, GEMV_PLAIN, 2)
GEMV_GGML_KERNEL(gemv_q5_k_m4, 13, GEMV_PLAIN, 4)
GEMV_GGML_KERNEL(gemv_q5_k_m8, 13, GEMV_PLAIN, 8)
GEMV_GGML_KERNEL(gemv_q5_k_silu_m1, 13, GEMV_SILU, 1)
GEMV_GGML_KERNEL(gemv_q5_k_silu_m2, 13, GEMV_SILU, 2)
GEMV_GGML_KERNEL(gemv_q5_k_silu_m4, 13, GEMV_SILU, 4)
GEMV_GGML_KERNEL(gemv_q5_k_silu_m8, 13, GEMV_SILU, 8)
GEMV_GGML_KERNEL(gemv_q5_k_norm_m1, 13, GEMV_NORM, 1)
GEMV_GGML_KERNEL(gemv_q5_k_norm_m2, 13, GEMV_NORM, 2)
GEMV_GGML_KERNEL(gemv_q5_k_norm_m4, 13, GEMV_NORM, 4)
GEMV_GGML_KERNEL(gemv_q5_k_norm_m8, 13, GEMV_NORM, 8)
GEMV_GGML_KERNEL(gemv_q5_k_merge_m1, 13, GEMV_MERGE, 1)
GEMV_GGML_KERNEL(gemv_q6_k_m1, 14, GEMV_PLAIN, 1)
GEMV_GGML_KERNEL(gemv_q6_k_m2, 14, GEMV_PLAIN, 2)
GEMV_GGML_KERNEL(gemv_q6_k_m4, 14, GEMV_PLAIN, 4)
GEMV_GGML_KERNEL(gemv_q6_k_m8, 14, GEMV_PLAIN, 8)
GEMV_GGML_KERNEL(gemv_q6_k_silu_m1, 14, GEMV_SILU, 1)
GEMV_GGML_KERNEL(gemv_q6_k_silu_m2, 14, GEMV_SILU, 2)
GEMV_GGML_KERNEL(gemv_q6_k_silu_m4, 14, GEMV_SILU, 4)
GEMV_GGML_KERNEL(gemv_q6_k_silu_m8, 14, GEMV_SILU, 8)
GEMV_GGML_KERNEL(gemv_q6_k_norm_m1, 14, GEMV_NORM, 1)
GEMV_GGML_KERNEL(gemv_q6_k_norm_m2, 14, GEMV_NORM, 2)
GEMV_GGML_KERNEL(gemv_q6_k_norm_m4, 14, GEMV_NORM, 4)
GEMV_GGML_KERNEL(gemv_q6_k_norm_m8, 14, GEMV_NORM, 8)
GEMV_GGML_KERNEL(gemv_q6_k_merge_m1, 14, GEMV_MERGE, 1)

// ---- Batched products from blocks on the tensor cores (MMQ) ----
// out[m, n] = x[m, :] · W[n, :] for 9 ≤ m ≤ 64, W in Q4_K blocks, as llama.cpp's MMQ: the weights'
// 4-bit quants are int8 operands of `mma.sync m16n8k32` as they lie in the block, the input is
// int8 per 32 values (q8_1, quantized once per product by `quantize_q8_mmq`), and each sub-block's
// int32 products are scaled in float: Σ w·x = d·sc·xd·Σ q·xq − dmin·mn·xs per 32 values, the
// GEMV's algebra on tensor cores.
//
// Input layout (`quantize_q8_mmq`, in the caller's scratch): for the TOKENS rows padded with zeros
// to 16, 32 or 64, xq int8 [k/32][TOKENS][32] with each group's values permuted so that an MMA
// B fragment is one 8-byte load (value 4t + i at byte 8t + i, value 16 + 4t + i at 8t + 4 + i), then
// the scales xd and scaled sums xs, float [k/32][TOKENS] each. A super-block's share of all three
// is contiguous, so it is copied to shared memory in three runs.
//
// A block owns MMQ_ROWS weight rows and all the tokens: warp w takes rows 16·(w % 4) .. + 15 and,
// at 64 tokens, the half w / 4 of them (8 warps: with 4, two a scheduler at two blocks a
// multiprocessor, the 8B Q4_K products took 807 µs against 725; at 32 tokens halves were 6%
// slower, H200), over the super-blocks (256 values of each row) of its split of k (grid y; one split
// writes `out`, several write float partials [split][m][n] that `mmq_reduce` sums). Super-blocks
// and their input stream through a MMQ_STAGES-deep ring of shared memory filled by cp.async, so a
// block keeps the next ones in flight while it computes and the MMA loop reads only shared memory
// (the first version read its input from global memory in the loop and was latency bound: 3x
// slower than bf16 cuBLAS at 16 rows). The rows' stride of 144 bytes (36 words) puts the 8 rows of
// an A fragment on distinct banks; a B fragment's 32 lanes read 256 contiguous bytes.

#define MMQ_ROWS 64
#define MMQ_STAGES 3

// 4 bytes at a 2-byte aligned shared-memory address.
__device__ __forceinline__ u32 lds_u16x2(const unsigned char* p) {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return (u32)h[0] | ((u32)h[1] << 16);
}

// What MMQ needs of a type: BYTES of 256 values of a row (one stage; whole 16-byte chunks),
// STRIDE between the rows of a stage in shared memory (BYTES, or more where that many words
// would put two of a fragment's 8 rows on one bank), and for sub-block j (values 32j .. 32j + 31)
// of a stage row: a lane's A fragment words (values 4·tig .. + 3 and 16 + 4·tig .. + 3, as int8)
// and the float factors of Σ w·x = ds·xd·Σ q·xq − dm·xs.
template <int TYPE>
struct MmqType;

template <>
struct MmqType<2> {  // Q4_0: 8 blocks of d, then value l low nibble of byte l, l + 16 its high one
    static constexpr int BYTES = 144, STRIDE = 144;
    __device__ __forceinline__ static void fragment(const unsigned char* row, int j, int tig, u32& a0, u32& a2, float& ds, float& dm) {
        const unsigned char* b = row + 18 * j;
        const u32 q = lds_u16x2(b + 2 + 4 * tig);
        a0 = q & NIBBLES, a2 = (q >> 4) & NIBBLES;
        ds = f16_bits(*reinterpret_cast<const unsigned short*>(b)), dm = 8.0f * ds;
    }
};
template <>
struct MmqType<3> {  // Q4_1: 8 blocks of d, m, then the nibbles as Q4_0's
    static constexpr int BYTES = 160, STRIDE = 176;
    __device__ __forceinline__ static void fragment(const unsigned char* row, int j, int tig, u32& a0, u32& a2, float& ds, float& dm) {
        const unsigned char* b = row + 20 * j;
        const u32 head = *reinterpret_cast<const u32*>(b), q = *reinterpret_cast<const u32*>(b + 4 + 4 * tig);
        a0 = q & NIBBLES, a2 = (q >> 4) & NIBBLES;
        ds = f16_bits(head), dm = -f16_bits(head >> 16);
    }
};
template <>
struct MmqType<8> {  // Q8_0: 8 blocks of d, then 32 int8
    static constexpr int BYTES = 272, STRIDE = 272;
    __device__ __forceinline__ static void fragment(const unsigned char* row, int j, int tig, u32& a0, u32& a2, float& ds, float& dm) {
        const unsigned char* b = row + 34 * j;
        a0 = lds_u16x2(b + 2 + 4 * tig), a2 = lds_u16x2(b + 18 + 4 * tig);
        ds = f16_bits(*reinterpret_cast<const unsigned short*>(b)), dm = 0.0f;
    }
};
// Q4_K and Q5_K: d, dmin, 12 scale bytes, (Q5_K: 32 bytes of fifth bits,) 128 bytes of nibbles;
// sub-block j is the low (j even) or high nibbles of bytes 32·(j / 2) .. + 31, value l at byte l.
template <bool Q5>
struct MmqTypeK45 {
    static constexpr int BYTES = Q5 ? 176 : 144, STRIDE = BYTES;
    __device__ __forceinline__ static void fragment(const unsigned char* row, int j, int tig, u32& a0, u32& a2, float& ds, float& dm) {
        const uint4 head = *reinterpret_cast<const uint4*>(row);
        const unsigned char* q = row + (Q5 ? 48 : 16) + 32 * (j >> 1) + 4 * tig;
        const int shift = 4 * (j & 1);
        a0 = (*reinterpret_cast<const u32*>(q) >> shift) & NIBBLES, a2 = (*reinterpret_cast<const u32*>(q + 16) >> shift) & NIBBLES;
        if constexpr (Q5) {
            const u32 h0 = *reinterpret_cast<const u32*>(row + 16 + 4 * tig), h1 = *reinterpret_cast<const u32*>(row + 32 + 4 * tig);
            a0 |= ((h0 >> j) & 0x01010101u) << 4, a2 |= ((h1 >> j) & 0x01010101u) << 4;
        }
        float sc, mn;
        k4_scale_min(head, j, sc, mn);
        ds = f16_bits(head.x) * sc, dm = f16_bits(head.x >> 16) * mn;
    }
};
template <>
struct MmqType<12> : MmqTypeK45<false> {};
template <>
struct MmqType<13> : MmqTypeK45<true> {};

// One thread per 8 input values (4 neighbouring threads a group of 32), over [k/32][tokens][4].
extern "C" __global__ void quantize_q8_mmq(signed char* __restrict__ xq, float* __restrict__ xd, float* __restrict__ xs,
                                           const __nv_bfloat16* __restrict__ x, int m, int k, int tokens) {
    PDL_ENTER();
    const int vecs = (k >> 3) * tokens;
    // The bound is the same for every lane of a warp (vecs is a multiple of 32), so each reaches every shuffle.
    for (int base = blockIdx.x * blockDim.x; base < vecs; base += gridDim.x * blockDim.x) {
        const int i = base + threadIdx.x, part = i & 3, token = (i >> 2) % tokens, group = (i >> 2) / tokens;
        float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (i < vecs && token < m) bf16x8_to_float(reinterpret_cast<const uint4*>(x + (u64)token * k + 32 * group)[part], f);
        u32 packed[2];
        float d, s;
        quantize_q8_group(f, packed, d, s);
        if (i < vecs) {
            // Values 8·part .. + 3 are 4t .. 4t + 3 (+ 16 for part ≥ 2) with t = 2·(part % 2); + 4 .. 7 are t + 1.
            signed char* g = xq + ((u64)group * tokens + token) * 32 + 16 * (part & 1) + 4 * (part >> 1);
            *reinterpret_cast<u32*>(g) = packed[0];
            *reinterpret_cast<u32*>(g + 8) = packed[1];
            if (part == 0) xd[group * tokens + token] = d, xs[group * tokens + token] = s;
        }
    }
}

template <int TYPE, int TOKENS>
__device__ __forceinline__ void mmq_body(void* __restrict__ out, int out_f32, float* __restrict__ partial,
                                         const signed char* __restrict__ xq, const float* __restrict__ xd,
                                         const float* __restrict__ xs, const unsigned char* __restrict__ w, int m, int n,
                                         int k, int split_sbs) {
    using T = MmqType<TYPE>;
    constexpr int NT = TOKENS / 8, W_BYTES = MMQ_ROWS * T::STRIDE, X_BYTES = TOKENS * 256, STAGE = W_BYTES + X_BYTES + 2 * 8 * TOKENS * 4;
    constexpr int HALVES = TOKENS == 64 ? 2 : 1, NTW = NT / HALVES;  // token halves, n8 tiles a warp
    constexpr int W_CHUNKS = MMQ_ROWS * T::BYTES / 16, X_CHUNKS = (STAGE - W_BYTES) / 16, THREADS = 4 * HALVES * 32;
    extern __shared__ __align__(16) unsigned char mmq_smem[];
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, gid = lane >> 2, tig = lane & 3;
    const int t0 = (threadIdx.x >> 7) * NTW;  // this warp's first n8 tile of tokens
    const int row0 = blockIdx.x * MMQ_ROWS, sbs = k >> 8;
    const int sb_begin = blockIdx.y * split_sbs, count = min(sbs, sb_begin + split_sbs) - sb_begin;
    const u64 row_bytes = (u64)sbs * T::BYTES;
    auto load_weights = [&](int i) {
        unsigned char* dst = mmq_smem + (i % MMQ_STAGES) * STAGE;
        const u64 sb = (u64)(sb_begin + i) * T::BYTES;
        for (int c = threadIdx.x; c < W_CHUNKS; c += THREADS) {
            const int r = c / (T::BYTES / 16), part = c - r * (T::BYTES / 16);
            const int row = min(row0 + r, n - 1);  // rows past n repeat the last; never stored
            cp_async_16(smem_addr(dst + r * T::STRIDE + part * 16), w + (u64)row * row_bytes + sb + part * 16, true);
        }
    };
    auto load_input = [&](int i) {
        unsigned char* dst = mmq_smem + (i % MMQ_STAGES) * STAGE + W_BYTES;
        const u64 g = (u64)(sb_begin + i) * 8 * TOKENS;  // the super-block's first group, times TOKENS
        for (int c = threadIdx.x; c < X_CHUNKS; c += THREADS) {
            const unsigned char* src;
            if (c < X_BYTES / 16) src = reinterpret_cast<const unsigned char*>(xq) + g * 32 + c * 16;
            else if (c < X_BYTES / 16 + 2 * TOKENS) src = reinterpret_cast<const unsigned char*>(xd + g) + (c - X_BYTES / 16) * 16;
            else src = reinterpret_cast<const unsigned char*>(xs + g) + (c - X_BYTES / 16 - 2 * TOKENS) * 16;
            cp_async_16(smem_addr(dst + c * 16), src, true);
        }
    };
    // Weights are never written by a kernel: the first super-blocks are requested before the wait,
    // the input (the previous kernel's output) after it. Group s holds stage s's input, and its
    // weights are in the same or an earlier group.
#pragma unroll
    for (int s = 0; s < MMQ_STAGES - 1; ++s)
        if (s < count) load_weights(s);
    pdl_wait();
    pdl_trigger();
#pragma unroll
    for (int s = 0; s < MMQ_STAGES - 1; ++s) {
        if (s < count) load_input(s);
        cp_async_commit();  // empty groups too: the wait count below assumes one group per stage
    }

    float acc[NTW][4];
#pragma unroll
    for (int t = 0; t < NTW; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    for (int i = 0; i < count; ++i) {
        cp_async_wait<MMQ_STAGES - 2>();  // stage i has landed
        __syncthreads();                  // ... for every thread, and every warp is done with i − 1
        if (i + MMQ_STAGES - 1 < count) {
            load_weights(i + MMQ_STAGES - 1);
            load_input(i + MMQ_STAGES - 1);
        }
        cp_async_commit();
        const unsigned char* stage = mmq_smem + (i % MMQ_STAGES) * STAGE;
        const signed char* sxq = reinterpret_cast<const signed char*>(stage + W_BYTES);  // [8][TOKENS][32]
        const float* sxd = reinterpret_cast<const float*>(stage + W_BYTES + X_BYTES);     // [8][TOKENS]
        const float* sxs = sxd + 8 * TOKENS;                                                // [8][TOKENS]
        // This lane's two rows (MMA rows gid and gid + 8) of the stage.
        const unsigned char* lo_row = stage + (warp * 16 + gid) * T::STRIDE;
        const unsigned char* hi_row = lo_row + 8 * T::STRIDE;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            u32 a[4];
            float ds_lo, dm_lo, ds_hi, dm_hi;
            T::fragment(lo_row, j, tig, a[0], a[2], ds_lo, dm_lo);
            T::fragment(hi_row, j, tig, a[1], a[3], ds_hi, dm_hi);
#pragma unroll
            for (int t = 0; t < NTW; ++t) {
                const int token = (t0 + t) * 8;
                const uint2 b = *reinterpret_cast<const uint2*>(sxq + ((j * TOKENS + token + gid) << 5) + 8 * tig);
                int c[4] = {0, 0, 0, 0};
                mma_s8(c, a, b.x, b.y);
                const float2 sd = *reinterpret_cast<const float2*>(sxd + j * TOKENS + token + 2 * tig);
                const float2 ss = *reinterpret_cast<const float2*>(sxs + j * TOKENS + token + 2 * tig);
                acc[t][0] += ds_lo * sd.x * (float)c[0] - dm_lo * ss.x;
                acc[t][1] += ds_lo * sd.y * (float)c[1] - dm_lo * ss.y;
                acc[t][2] += ds_hi * sd.x * (float)c[2] - dm_hi * ss.x;
                acc[t][3] += ds_hi * sd.y * (float)c[3] - dm_hi * ss.y;
            }
        }
    }
    // Accumulator (t, e) is weight row gid (+ 8 for e ≥ 2) by token 8·(t0 + t) + 2·tig (+ 1 for odd e).
    const int row_lo = row0 + warp * 16 + gid;
#pragma unroll
    for (int t = 0; t < NTW; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int token = (t0 + t) * 8 + 2 * tig + (e & 1), row = row_lo + (e >> 1) * 8;
            if (token < m && row < n) {
                const u64 at = (u64)token * n + row;
                if (gridDim.y > 1) partial[(u64)blockIdx.y * m * n + at] = acc[t][e];
                else if (out_f32) reinterpret_cast<float*>(out)[at] = acc[t][e];
                else reinterpret_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16(acc[t][e]);
            }
        }
}

#define MMQ_KERNEL(MMQ_FN, TYPE, TOKENS)                                                                              \
    extern "C" __global__ void __launch_bounds__(TOKENS == 64 ? 256 : 128)                                            \
        MMQ_FN(void* out, int out_f32, float* partial, const signed char* xq, const float* xd, const float* xs,       \
               const unsigned char* w, int m, int n, int k, int split_sbs) {                                          \
        mmq_body<TYPE, TOKENS>(out, out_f32, partial, xq, xd, xs, w, m, n, k, split_sbs);                             \
    }

MMQ_KERNEL(mmq_q4_0_t16, 2, 16)
MMQ_KERNEL(mmq_q4_0_t32, 2, 32)
MMQ_KERNEL(mmq_q4_0_t64, 2, 64)
MMQ_KERNEL(mmq_q4_1_t16, 3, 16)
MMQ_KERNEL(mmq_q4_1_t32, 3, 32)
MMQ_KERNEL(mmq_q4_1_t64, 3, 64)
MMQ_KERNEL(mmq_q8_0_t16, 8, 16)
MMQ_KERNEL(mmq_q8_0_t32, 8, 32)
MMQ_KERNEL(mmq_q8_0_t64, 8, 64)
MMQ_KERNEL(mmq_q4_k_t16, 12, 16)
MMQ_KERNEL(mmq_q4_k_t32, 12, 32)
MMQ_KERNEL(mmq_q4_k_t64, 12, 64)
MMQ_KERNEL(mmq_q5_k_t16, 13, 16)
MMQ_KERNEL(mmq_q5_k_t32, 13, 32)
MMQ_KERNEL(mmq_q5_k_t64, 13, 64)

// out = the sum of `splits` float partials [split][m·n]; one thread per output.
extern "C" __global__ void mmq_reduce(void* __restrict__ out, int out_f32, const float* __restrict__ partial, int count, int splits) {
    PDL_ENTER();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < splits; ++s) sum += partial[(u64)s * count + i];
        if (out_f32) reinterpret_cast<float*>(out)[i] = sum;
        else reinterpret_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16(sum);
    }
}
