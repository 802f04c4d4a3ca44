// GGUF tensors dequantized on the device: the stored blocks are copied to the GPU as they are and
// expanded here to the bf16 matrix the forward reads, so a quantized model never passes through
// float32 host memory. One thread per ggml block (32 or 256 values, all in one row); `type` is
// ggml's type id (`GgmlType`); the formats follow `model/gguf/dequant.rs`, the CPU reference.
//
// Rows can be written to other places: with `qk_head_dim` > 0, a Llama Q/K matrix is put back from
// llama.cpp's interleaved order (within each head, stored row 2i + j is Hugging Face row
// j * head_dim / 2 + i).

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

__device__ __forceinline__ void put(__nv_bfloat16* y, int i, float v) { y[i] = __float2bfloat16(v); }

__device__ void dequant_block(int type, const unsigned char* blk, __nv_bfloat16* y) {
    switch (type) {
        case 0: put(y, 0, __uint_as_float(blk[0] | (blk[1] << 8) | (blk[2] << 16) | ((unsigned)blk[3] << 24))); break;
        case 1: put(y, 0, f16_at(blk, 0)); break;
        case 30: put(y, 0, __uint_as_float((unsigned)(blk[0] | (blk[1] << 8)) << 16)); break;
        case 2: {
            const float d = f16_at(blk, 0);
            for (int j = 0; j < 16; j++) {
                put(y, j, ((blk[2 + j] & 0x0F) - 8) * d);
                put(y, j + 16, ((blk[2 + j] >> 4) - 8) * d);
            }
            break;
        }
        case 3: {
            const float d = f16_at(blk, 0), m = f16_at(blk, 2);
            for (int j = 0; j < 16; j++) {
                put(y, j, (blk[4 + j] & 0x0F) * d + m);
                put(y, j + 16, (blk[4 + j] >> 4) * d + m);
            }
            break;
        }
        case 6:
        case 7: {
            const bool q51 = type == 7;
            const float d = f16_at(blk, 0), m = q51 ? f16_at(blk, 2) : 0.0f;
            const unsigned char* h = blk + (q51 ? 4 : 2);
            const unsigned qh = h[0] | (h[1] << 8) | (h[2] << 16) | ((unsigned)h[3] << 24);
            const unsigned char* qs = h + 4;
            for (int j = 0; j < 16; j++) {
                const int x0 = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
                const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
                put(y, j, q51 ? x0 * d + m : (x0 - 16) * d);
                put(y, j + 16, q51 ? x1 * d + m : (x1 - 16) * d);
            }
            break;
        }
        case 8: {
            const float d = f16_at(blk, 0);
            for (int j = 0; j < 32; j++) put(y, j, (float)(signed char)blk[2 + j] * d);
            break;
        }
        case 10: {
            const unsigned char* scales = blk;
            const float d = f16_at(blk, 80), min = f16_at(blk, 82);
            int is = 0, yi = 0;
            for (int n = 0; n < 2; n++) {
                const unsigned char* q = blk + 16 + 32 * n;
                for (int shift = 0; shift < 8; shift += 2)
                    for (int half = 0; half < 2; half++) {
                        const unsigned char sc = scales[is++];
                        const float dl = d * (sc & 0x0F), ml = min * (sc >> 4);
                        for (int l = 0; l < 16; l++) put(y, yi++, dl * ((q[l + 16 * half] >> shift) & 3) - ml);
                    }
            }
            break;
        }
        case 11: {
            const unsigned char *hm = blk, *packed = blk + 96;
            const float d_all = f16_at(blk, 108);
            int is = 0, yi = 0;
            unsigned char m = 1;
            for (int n = 0; n < 2; n++) {
                const unsigned char* q = blk + 32 + 32 * n;
                for (int shift = 0; shift < 8; shift += 2) {
                    for (int half = 0; half < 2; half++) {
                        const int i = is++;
                        const int low = i < 8 ? packed[i] & 0x0F : packed[i - 8] >> 4;
                        const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
                        const float dl = d_all * (float)((low | (high << 4)) - 32);
                        for (int l = 16 * half; l < 16 * half + 16; l++) {
                            const int q2 = (q[l] >> shift) & 3;
                            put(y, yi++, dl * (float)(q2 - ((hm[l] & m) ? 0 : 4)));
                        }
                    }
                    m <<= 1;
                }
            }
            break;
        }
        case 12:
        case 13: {
            const bool q5 = type == 13;
            const float d = f16_at(blk, 0), min = f16_at(blk, 2);
            const unsigned char* scales = blk + 4;
            const unsigned char* qh = blk + 16;
            for (int j = 0; j < 4; j++) {
                const unsigned char* q = blk + (q5 ? 48 : 16) + 32 * j;
                float sc1, m1, sc2, m2;
                scale_min_k4(2 * j, scales, sc1, m1);
                scale_min_k4(2 * j + 1, scales, sc2, m2);
                const float d1 = d * sc1, mm1 = min * m1, d2 = d * sc2, mm2 = min * m2;
                for (int l = 0; l < 32; l++) {
                    const int h1 = q5 && (qh[l] & (1 << (2 * j))) ? 16 : 0;
                    const int h2 = q5 && (qh[l] & (2 << (2 * j))) ? 16 : 0;
                    put(y, 64 * j + l, d1 * ((q[l] & 0x0F) + h1) - mm1);
                    put(y, 64 * j + l + 32, d2 * ((q[l] >> 4) + h2) - mm2);
                }
            }
            break;
        }
        case 14: {
            const float d = f16_at(blk, 208);
            for (int n = 0; n < 2; n++) {
                const unsigned char *ql = blk + 64 * n, *qh = blk + 128 + 32 * n;
                const signed char* sc = (const signed char*)(blk + 192 + 8 * n);
                for (int l = 0; l < 32; l++) {
                    const int is = l / 16;
                    const int q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                    const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    put(y, 128 * n + l, d * sc[is] * q1);
                    put(y, 128 * n + l + 32, d * sc[is + 2] * q2);
                    put(y, 128 * n + l + 64, d * sc[is + 4] * q3);
                    put(y, 128 * n + l + 96, d * sc[is + 6] * q4);
                }
            }
            break;
        }
        case 15: {
            const float d = __uint_as_float(blk[0] | (blk[1] << 8) | (blk[2] << 16) | ((unsigned)blk[3] << 24));
            for (int j = 0; j < 256; j++) put(y, j, d * (float)(signed char)blk[4 + j]);
            break;
        }
    }
}

// `rows` rows of `cols` values (cols a multiple of the type's block) from `in` into `out`.
extern "C" __global__ void dequant_ggml(__nv_bfloat16* __restrict__ out, const unsigned char* __restrict__ in,
                                        int type, int rows, int cols, int qk_head_dim) {
    PDL_ENTER();
    int values, bytes;
    ggml_block(type, values, bytes);
    if (values == 0) return;
    const u64 per_row = cols / values, total = (u64)rows * per_row;
    for (u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x; b < total; b += (u64)gridDim.x * blockDim.x) {
        const int row = (int)(b / per_row), col = (int)(b % per_row) * values;
        int dst = row;
        if (qk_head_dim > 0) {
            const int head = row / qk_head_dim, w = row % qk_head_dim;
            dst = head * qk_head_dim + (w & 1) * (qk_head_dim / 2) + (w >> 1);
        }
        dequant_block(type, in + b * bytes, out + (u64)dst * cols + col);
    }
}
