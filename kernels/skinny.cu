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
//    split), in chunks of SK_KC = 64 values. A warp's chunk (its 16 rows × 64 values, 2 KB) goes
//    through its own cp.async ring (SK_STAGES chunks, SK_STAGES - 1 in flight while one is
//    multiplied); copy instruction v takes rows 4v .. 4v + 3, lane l the 16-byte vector l % 8 of
//    row 4v + l / 8, so each instruction reads four whole 128-byte lines. A stage keeps row r's
//    vector t at slot r·8 + (t ^ (r % 8)), so that the ldmatrix reads (8 rows, one vector each)
//    fall on distinct banks, and ldmatrix.x4 hands each K step's A fragments to `mma` in its own
//    layout; the input rows' B fragments come from the staged slice by ldmatrix too. A warp's
//    lanes read each other's slots, so every chunk starts with a __syncwarp (after the wait for
//    its copies, before the slot of the chunk before is refilled). How the copies are laid out
//    decided the speed (H100, BENCHMARKS.md session 25, the five 8B products at 2-64 rows,
//    bytes over summed time): a lane owning 32 contiguous bytes of rows g and g + 8 (fragments
//    without ldmatrix) asked for each 32-byte sector twice, half each time: 1,440-1,690 GB/s;
//    whole sectors (64 bytes a row an instruction): 2,180-2,270; whole lines: 2,160-2,600;
//    cuBLAS: 2,630-2,780. A layer's four products still take 1.13x cuBLAS's time at 2 rows,
//    1.10x at 8, 1.18x at 16, 1.27x at 32 and 1.51x at 64 (most where K is split), so the
//    kernel is off by default (`skinny::Skinny::rows_from_env`). No L2 eviction hint on these
//    copies: with one, ptxas (12.9, and the 580 driver's JIT) put the cache-policy operand of
//    some copies in an odd uniform register, an illegal instruction (compute-sanitizer; now
//    caught by scripts/sass-check.sh); without one, the whole-sector kernel was 2% slower;
//    2 or 4 warps sharing a row group and taking its chunks in turn (longer runs of each row in
//    flight, `327932d`) gained nothing consistent (session 26) and were taken out again;
//  * the input rows are staged in shared memory a slice of K at a time ([8·NT][SK_SLICE / NT +
//    SK_XPAD] bf16: 32 KB and a little whatever NT; 16 bytes of padding a row keep ldmatrix's
//    row reads on distinct banks), double-buffered, with cp.async copies that ride in the
//    weight ring's commit groups (a slice's copies go with the group of the first chunk of the
//    slice before it, so waiting for a chunk's weights also covers its slice; one barrier a
//    slice);
//  * with one split, each lane writes its accumulators to y. With several, every block writes
//    its float32 partial [m][rows] to `partials` (split-major) and counts itself in its row
//    group's `arrivals`; the last block of the group adds the splits in split order (the same
//    sum whichever block comes last) and writes y, then sets the counter back to zero for the
//    next launch. The host sizes the splits so that the grid fills the GPU once (`launch::
//    skinny_plan`): QKV and o-projections of the 8B model have too few rows to.
// kernels/emulate/skinny.py replays the copies, the swizzle, the ldmatrix reads, the fragments,
// the epilogue and the split-K sums against a plain product.
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
// bf16 of padding a staged input row: 16 bytes, so that ldmatrix's 8 row reads fall on
// different banks.
#define SK_XPAD 8

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
    constexpr int XSTRIDE = SLICE + SK_XPAD;       // bf16 a staged row
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

    // A ring stage is the chunk's 16 rows × 64 values, row r's 16-byte vector t at slot
    // r·8 + (t ^ (r & 7)) (the XOR keeps ldmatrix's 8 row reads on distinct banks). Copy
    // instruction v takes rows 4v .. 4v + 3, lane l vector l & 7 of row 4v + l / 8: four whole
    // 128-byte lines.
    auto issue_chunk = [&](int q) {
        if (q < chunks) {
            const int t = lane & 7;
            const int kk = k_begin + q * SK_KC + 8 * t;
            uint4* stage = my_ring + (q % SK_STAGES) * 4 * 32;
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int r = 4 * v + (lane >> 3);
                const bool valid = row0 + r < n;
                const __nv_bfloat16* src = w + (u64)(valid ? row0 + r : 0) * k + kk;
                cp_async_16(smem_addr(stage + r * 8 + (t ^ (r & 7))), src, valid);
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
        // The lanes' copies of chunk q are visible to the whole warp (ldmatrix reads other lanes'
        // slots), and every lane's reads of chunk q - 1, whose slot is refilled next, are done.
        __syncwarp();
        issue_chunk(q + SK_STAGES - 1);
        cp_async_commit();

        const uint4* stage = my_ring + (q % SK_STAGES) * 4 * 32;
        // A of K step s (values 16s .. 16s + 15): lane l addresses row (l & 7) + 8·((l >> 3) & 1),
        // vector 2s + l / 16, so the four matrices are A's fragments a0..a3.
        u32 a[4][4];
        {
            const int r = (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
            for (int step = 0; step < 4; ++step)
                ldmatrix_x4(a[step], smem_addr(stage + r * 8 + ((2 * step + (lane >> 4)) ^ (r & 7))));
        }
        const __nv_bfloat16* buf = xs + ((q / CPS) & 1) * ROWS * XSTRIDE + (q % CPS) * SK_KC;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            // B: lane l addresses input row 8j + (l & 7), vector l / 8 (`lo`: vectors 0-3) and
            // 4 + l / 8 (`hi`); K step s takes vectors 2s and 2s + 1.
            u32 lo[4], hi[4];
            const __nv_bfloat16* row = buf + (8 * j + (lane & 7)) * XSTRIDE + 8 * (lane >> 3);
            ldmatrix_x4(lo, smem_addr(row));
            ldmatrix_x4(hi, smem_addr(row + 32));
            mma_bf16(acc[j], a[0], lo[0], lo[1]);
            mma_bf16(acc[j], a[1], lo[2], lo[3]);
            mma_bf16(acc[j], a[2], hi[0], hi[1]);
            mma_bf16(acc[j], a[3], hi[2], hi[3]);
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
