// Skinny products on the tensor cores: y[m, n] = x[m, :] · W[n, :] for a few tens of input rows
// (2 ≤ m ≤ 64), bf16 weights and input, float32 accumulation, bf16 or float32 out. At these m a
// linear layer is still a weight stream (N·K·2 bytes of W against M·K·2 of x), but the GEMV's
// CUDA-core dot products (`gemv.cu`) grow with the rows, and cuBLAS's kernels for them reached
// 74-84% of the copy rate on the 8B shapes at 32 rows and split K into a second launch
// (BENCHMARKS.md, session 23's profile). Here the weights stream as the GEMV streams them and
// the tensor cores do the products:
//
//  * a block is SK_WARPS warps; warp w owns 16 weight rows (the A operand of
//    `mma.sync m16n8k16`, the M side: out columns), so a block covers 16·SK_WARPS rows; the
//    input rows are the N side, NT tiles of 8 (m ≤ 8·NT; rows past m are zeros);
//  * the block takes one stretch of K (`k_per_split`, a multiple of SK_KC; the grid's y is the
//    split), in chunks of SK_KC = 64 values. Lane (g, c) = (lane / 4, lane % 4) copies, for rows g
//    and g + 8 of its warp's 16, the 16 values [16c, 16c + 16) of each chunk (two 16-byte
//    vectors a row: one 128-byte line a row a chunk across the four lanes of a row) into its own
//    slots of the warp's cp.async ring (SK_STAGES chunks, SK_STAGES - 1 in flight while one is
//    multiplied), and reads back only those, so the ring needs no barrier. Weights are read
//    once: the copies go under an evict-first L2 policy;
//  * the K values a lane holds are not the ones `mma`'s fragment layout names, and need not be:
//    a dot product is the same in any order of K, so long as A and B agree. K step s (0..3) of a
//    chunk takes logical columns {2c, 2c+1} from physical [16c + 4s, 16c + 4s + 2) and {2c + 8,
//    2c + 9} from [16c + 4s + 2, 16c + 4s + 4): word 2s and word 2s + 1 of the lane's 32 bytes,
//    for A (its weights) and B (the input rows, read the same way from shared memory). No
//    shuffles, no ldmatrix: each lane's 16-byte reads are whole fragments
//    (kernels/emulate/skinny.py replays this against a plain product);
//  * the input rows are staged in shared memory a slice of K at a time ([8·NT][SK_SLICE / NT + 8]
//    bf16: 32 KB whatever NT; 16 bytes of padding a row keep the fragment reads free of bank
//    conflicts), double-buffered, with cp.async copies that ride in the weight ring's commit
//    groups (a slice's copies go with the group of the first chunk of the slice before it, so
//    waiting for a chunk's weights also covers its slice; one barrier a slice);
//  * with one split, each lane writes its accumulators to y. With several, every block writes
//    its float32 partial [m][rows] to `partials` (split-major) and counts itself in its row
//    group's `arrivals`; the last block of the group adds the splits in split order (the same
//    sum whichever block comes last) and writes y, then sets the counter back to zero for the
//    next launch. The host sizes the splits so that the grid fills the GPU once (`launch::
//    skinny_plan`): QKV and o-projections of the 8B model have too few rows to.
//
// The kernels are named as GEMVs (`gemv_mma_n{NT}`): they are weight streams that issue their first
// copies before the programmatic-dependent wait, and launch in the GEMV's PDL scope.
//
// Under a programmatic dependent launch the weight copies of the first SK_STAGES - 1 chunks go
// out before the wait for the kernel that writes x (weights are never written by a kernel).

#define SK_WARPS 16
#define SK_KC 64
#define SK_STAGES 4
// K values of one staged slice of x times NT (the slice is 2048 / NT values of 8·NT rows).
#define SK_SLICE 2048

// What x is (`MODE`): SK_PLAIN, the bf16 input rows [m][k]; SK_SILU, the gate_up rows [m][2k] of a
// gated MLP, whose activation silu(gate) · up (`silu_and_mul`'s formula and bf16 rounding) the
// block computes as it stages each slice, so that kernel and its round trip are skipped. Its
// loads are plain loads, issued at the start of the slice before (into registers: SK_SILU_VECS
// gate and up vectors a thread) and stored at that slice's last chunk, so their latency hides
// behind a slice of products.
#define SK_PLAIN 0
#define SK_SILU 1
// 16-byte vectors of a staged slice a thread: 8·NT rows of SK_SLICE / NT values are 2048 vectors.
#define SK_SILU_VECS (SK_SLICE * 8 / 8 / (SK_WARPS * 32))

template <int NT, int MODE>
__device__ __forceinline__ void skinny_body(void* __restrict__ out, int out_f32, const __nv_bfloat16* __restrict__ x,
                                            const __nv_bfloat16* __restrict__ w, float* __restrict__ partials,
                                            u32* __restrict__ arrivals, int m, int n, int k, int k_per_split) {
    constexpr int SLICE = SK_SLICE / NT;           // K values of a staged slice
    constexpr int XSTRIDE = SLICE + 8;             // bf16 a staged row (16 bytes of padding)
    constexpr int CPS = SLICE / SK_KC;             // chunks a slice
    constexpr int ROWS = 8 * NT;                   // staged input rows
    static_assert(CPS >= SK_STAGES - 1, "a slice's copies must land before its first chunk is waited for");
    extern __shared__ __align__(16) unsigned char skinny_smem[];
    // The ring: [warp][stage][4 vectors][32 lanes] of 16 bytes; then two slices of x.
    uint4* ring = reinterpret_cast<uint4*>(skinny_smem);
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(skinny_smem + SK_WARPS * SK_STAGES * 4 * 32 * 16);
    __shared__ bool last_s;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int rows_per_block = 16 * SK_WARPS;
    const int row0 = blockIdx.x * rows_per_block + warp * 16;
    const int k_begin = blockIdx.y * k_per_split;
    const int k_end = min(k, k_begin + k_per_split);
    const int chunks = (k_end - k_begin) / SK_KC;
    uint4* my_ring = ring + warp * SK_STAGES * 4 * 32;
    const u64 policy = l2_evict_first_policy();

    // Vector v of a chunk: row g (v = 0, 1) or g + 8 (v = 2, 3), values 16c + 8·(v & 1).
    auto issue_chunk = [&](int q) {
        if (q < chunks) {
            const int kk = k_begin + q * SK_KC + 16 * c;
            uint4* stage = my_ring + (q % SK_STAGES) * 4 * 32;
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int row = row0 + g + 8 * (v >> 1);
                const bool valid = row < n;
                const __nv_bfloat16* src = w + (u64)(valid ? row : 0) * k + kk + 8 * (v & 1);
                cp_async_16_hint(smem_addr(stage + v * 32 + lane), src, valid, policy);
            }
        }
    };
    // Slice i of x (chunks [i·CPS, (i+1)·CPS) of this block's stretch) into buffer i % 2, by the
    // whole block; rows past m are zeros. SK_PLAIN: cp.async copies (they ride in the next commit
    // group). SK_SILU: `load_slice` takes the gate and up vectors into registers, `store_slice`
    // writes their activation.
    auto slice_vecs = [&](int i) {  // 16-byte vectors a row of slice i (0 past the stretch)
        const int first = i * CPS;
        return first >= chunks ? 0 : min(CPS, chunks - first) * SK_KC / 8;
    };
    auto issue_slice = [&](int i) {
        const int vecs_per_row = slice_vecs(i);
        const int kk0 = k_begin + i * CPS * SK_KC;
        __nv_bfloat16* buf = xs + (i & 1) * ROWS * XSTRIDE;
        for (int e = threadIdx.x; e < ROWS * vecs_per_row; e += blockDim.x) {
            const int r = e / vecs_per_row, v = e - r * vecs_per_row;
            const bool valid = r < m;
            cp_async_16(smem_addr(buf + r * XSTRIDE + 8 * v), x + (u64)(valid ? r : 0) * k + kk0 + 8 * v, valid);
        }
    };
    uint4 gate_v[MODE == SK_SILU ? SK_SILU_VECS : 1], up_v[MODE == SK_SILU ? SK_SILU_VECS : 1];
    auto load_slice = [&](int i) {
        const int vecs_per_row = slice_vecs(i);
        const int kk0 = k_begin + i * CPS * SK_KC;
#pragma unroll
        for (int t = 0; t < SK_SILU_VECS; ++t) {
            const int e = threadIdx.x + t * SK_WARPS * 32;
            const int r = vecs_per_row > 0 ? e / vecs_per_row : ROWS, v = e - r * vecs_per_row;
            if (r < m) {
                const __nv_bfloat16* row = x + (u64)r * 2 * k + kk0 + 8 * v;
                gate_v[t] = *reinterpret_cast<const uint4*>(row);
                up_v[t] = *reinterpret_cast<const uint4*>(row + k);
            }
        }
    };
    auto store_slice = [&](int i) {
        const int vecs_per_row = slice_vecs(i);
        __nv_bfloat16* buf = xs + (i & 1) * ROWS * XSTRIDE;
#pragma unroll
        for (int t = 0; t < SK_SILU_VECS; ++t) {
            const int e = threadIdx.x + t * SK_WARPS * 32;
            const int r = vecs_per_row > 0 ? e / vecs_per_row : ROWS, v = e - r * vecs_per_row;
            if (r < ROWS) {
                float a[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                if (r < m) {
                    float g[8], u[8];
                    bf16x8_to_float(gate_v[t], g);
                    bf16x8_to_float(up_v[t], u);
#pragma unroll
                    for (int j = 0; j < 8; ++j) a[j] = g[j] / (1.0f + __expf(-g[j])) * u[j];
                }
                *reinterpret_cast<uint4*>(buf + r * XSTRIDE + 8 * v) = float8_to_bf16x8(a);
            }
        }
    };

#pragma unroll
    for (int q = 0; q < SK_STAGES - 1; ++q) {
        issue_chunk(q);
        cp_async_commit();
    }
    pdl_wait();
    pdl_trigger();
    if (MODE == SK_SILU) {
        load_slice(0);
        store_slice(0);
    } else {
        issue_slice(0);
    }
    cp_async_commit();

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

    for (int q = 0; q < chunks; ++q) {
        if (q == 0) cp_async_wait<0>();
        else cp_async_wait<SK_STAGES - 2>();
        if (q % CPS == 0) {
            // Everyone's part of this slice has landed, and nobody reads the slice before it,
            // whose buffer the next slice takes.
            __syncthreads();
            if (MODE == SK_SILU) load_slice(q / CPS + 1);
            else issue_slice(q / CPS + 1);
        }
        // The next slice's activation goes in at this slice's last chunk (its buffer's readers,
        // the slice before, are past the barrier above).
        if (MODE == SK_SILU && (q % CPS == CPS - 1 || q == chunks - 1)) store_slice(q / CPS + 1);
        issue_chunk(q + SK_STAGES - 1);
        cp_async_commit();

        const uint4* stage = my_ring + (q % SK_STAGES) * 4 * 32;
        const uint4 w0 = stage[0 * 32 + lane], w1 = stage[1 * 32 + lane];  // row g
        const uint4 w2 = stage[2 * 32 + lane], w3 = stage[3 * 32 + lane];  // row g + 8
        const __nv_bfloat16* buf = xs + ((q / CPS) & 1) * ROWS * XSTRIDE + (q % CPS) * SK_KC + 16 * c;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const uint4 x0 = *reinterpret_cast<const uint4*>(buf + (8 * j + g) * XSTRIDE);
            const uint4 x1 = *reinterpret_cast<const uint4*>(buf + (8 * j + g) * XSTRIDE + 8);
            // K steps 0 and 1 from the first 8 values, 2 and 3 from the second.
            { const u32 a[4] = {w0.x, w2.x, w0.y, w2.y}; mma_bf16(acc[j], a, x0.x, x0.y); }
            { const u32 a[4] = {w0.z, w2.z, w0.w, w2.w}; mma_bf16(acc[j], a, x0.z, x0.w); }
            { const u32 a[4] = {w1.x, w3.x, w1.y, w3.y}; mma_bf16(acc[j], a, x1.x, x1.y); }
            { const u32 a[4] = {w1.z, w3.z, w1.w, w3.w}; mma_bf16(acc[j], a, x1.z, x1.w); }
        }
    }
    cp_async_wait<0>();

    // acc[j][e]: weight row row0 + g + 8·(e >> 1), input row 8j + 2c + (e & 1).
    if (gridDim.y == 1) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + g + 8 * (e >> 1), r = 8 * j + 2 * c + (e & 1);
                if (row < n && r < m) {
                    const u64 at = (u64)r * n + row;
                    if (out_f32) reinterpret_cast<float*>(out)[at] = acc[j][e];
                    else reinterpret_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16(acc[j][e]);
                }
            }
        return;
    }
    float* mine = partials + (u64)blockIdx.y * m * n;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + g + 8 * (e >> 1), r = 8 * j + 2 * c + (e & 1);
            if (row < n && r < m) mine[(u64)r * n + row] = acc[j][e];
        }
    // Every thread's partial is visible GPU-wide before the block is counted.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_s = atomicAdd(&arrivals[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    // The group's m × rows sums, by the whole block, the latency of its L2 reads overlapped: four
    // neighbouring rows a thread (16-byte reads where n allows), its NT slots' reads all issued
    // before their sums (a slot a time, each split's read waiting on the last, took one L2
    // round trip per split per slot: tens of µs of tail for one block while the GPU idled).
    const int first_row = blockIdx.x * rows_per_block;
    const int rows = min(rows_per_block, n - first_row);
    const int quads = (rows + 3) / 4;
    const int splits = gridDim.y;
    const bool vec = (n & 3) == 0;
#pragma unroll
    for (int slot = 0; slot < NT; ++slot) {
        // m × quads ≤ 8·NT × 64 = NT · 512 = NT · blockDim.x.
        const int e = threadIdx.x + slot * SK_WARPS * 32;
        if (e >= m * quads) continue;
        const int r = e / quads, row = first_row + 4 * (e - r * quads);
        const u64 at = (u64)r * n + row;
        float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
        for (int s = 0; s < splits; ++s) {
            const float* p = partials + (u64)s * m * n + at;
            if (vec) {
                const float4 v = __ldcg(reinterpret_cast<const float4*>(p));
                sum[0] += v.x, sum[1] += v.y, sum[2] += v.z, sum[3] += v.w;
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) if (row + i < n) sum[i] += __ldcg(p + i);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (row + i >= min(n, first_row + rows)) break;
            if (out_f32) reinterpret_cast<float*>(out)[at + i] = sum[i];
            else reinterpret_cast<__nv_bfloat16*>(out)[at + i] = __float2bfloat16(sum[i]);
        }
    }
    if (threadIdx.x == 0) arrivals[blockIdx.x] = 0;
}

#define SKINNY_KERNEL(NAME, NT, MODE)                                                                                \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)                                                     \
        NAME(void* out, int out_f32, const __nv_bfloat16* x, const __nv_bfloat16* w, float* partials, u32* arrivals, \
             int m, int n, int k, int k_per_split) {                                                                 \
        skinny_body<NT, MODE>(out, out_f32, x, w, partials, arrivals, m, n, k, k_per_split);                        \
    }

SKINNY_KERNEL(gemv_mma_n1, 1, SK_PLAIN)
SKINNY_KERNEL(gemv_mma_n2, 2, SK_PLAIN)
SKINNY_KERNEL(gemv_mma_n4, 4, SK_PLAIN)
SKINNY_KERNEL(gemv_mma_n8, 8, SK_PLAIN)
SKINNY_KERNEL(gemv_mma_silu_n1, 1, SK_SILU)
SKINNY_KERNEL(gemv_mma_silu_n2, 2, SK_SILU)
SKINNY_KERNEL(gemv_mma_silu_n4, 4, SK_SILU)
SKINNY_KERNEL(gemv_mma_silu_n8, 8, SK_SILU)
