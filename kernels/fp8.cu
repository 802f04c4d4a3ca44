// FP8 (E4M3) with one float32 scale per row: the format of `model/fp8.rs` (the CPU reference),
// made on the device. `--quantization fp8` quantizes each bf16 weight matrix here at load, and an
// FP8 product through cuBLASLt quantizes its bf16 input here, per token, before the GEMM.
//
// A row's scale is max|x| / 448 (448 is E4M3's largest finite value; a row of zeros gets 1, a
// row of tiny values at least FLT_MIN), each value x / scale rounded to nearest even, exactly as
// `Fp8Matrix::quantize` computes it: the division is IEEE (NVRTC's default -prec-div), the
// rounding the hardware's cvt.rn.satfinite (the saturation never acts: |x / scale| <= 448).
// The E4M3 conversions (`common.cuh`) are sm_89 (Ada) and later instructions; the host refuses
// FP8 before that.

#define E4M3_MAX 448.0f
#define FP8_FLT_MIN 1.17549435e-38f

// Row r of the bf16 [rows, cols] matrix x (cols even) to E4M3 in q, its scale to scales[r]; one
// block per row.
extern "C" __global__ void fp8_quantize_rows(unsigned char* q, float* scales, const __nv_bfloat16* x, int cols) {
    PDL_ENTER();
    __shared__ float scratch[32];
    const u64 row = blockIdx.x;
    const __nv_bfloat162* xr = reinterpret_cast<const __nv_bfloat162*>(x + row * cols);
    const int pairs = cols >> 1;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const float2 v = __bfloat1622float2(xr[i]);
        amax = fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y)));
    }
    amax = block_max(amax, scratch);
    const float scale = amax > 0.0f ? fmaxf(amax / E4M3_MAX, FP8_FLT_MIN) : 1.0f;
    if (threadIdx.x == 0) scales[row] = scale;
    unsigned short* qr = reinterpret_cast<unsigned short*>(q + row * cols);
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const float2 v = __bfloat1622float2(xr[i]);
        qr[i] = e4m3x2_from_floats(v.x / scale, v.y / scale);
    }
}

// out[r, c] *= row_scales[r] * col_scales[c] over a bf16 [rows, n] product, one block per row:
// the scales of an FP8 GEMM whose cuBLASLt cannot apply per-row and per-column scales itself.
extern "C" __global__ void fp8_scale_output(__nv_bfloat16* out, const float* row_scales, const float* col_scales, int n) {
    PDL_ENTER();
    const u64 row = blockIdx.x;
    const float rs = row_scales[row];
    __nv_bfloat16* o = out + row * n;
    for (int c = threadIdx.x; c < n; c += blockDim.x) o[c] = __float2bfloat16(__bfloat162float(o[c]) * rs * col_scales[c]);
}
