// Greedy sampling on the device: the index of the largest logit of each row (the first on ties,
// as torch.argmax), so only one integer per sequence crosses to the host.
extern "C" __global__ void argmax_rows(u32* __restrict__ out, const float* __restrict__ logits, int vocab) {
    PDL_ENTER();
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
    PDL_ENTER();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float unit = (float)(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        out[i] = __float2bfloat16((2.0f * unit - 1.0f) * scale);
    }
}

// ---------------------------------------------------------------------------------------------
// Full sampling on the device: one 1024-thread block per sample (`sample_rows`), parameters from
// a packed per-row array (layout in host/src/cuda/sampling.rs, which must agree with the P_*
// words below), so only tokens, log-probs and candidates cross to the host.
//
// Per row, in the CPU sampler's order (host/src/sampling/sampler.rs):
//  1. Bias, penalties and constraint masks (rows that have any): the raw row is copied to a work
//     row, then the sparse logit bias (CSR) is added and the penalty entries (CSR: prompt and
//     output tokens with their output counts) are applied with the CPU's exact float operations
//     (no FMA contraction). A constrained row's tokens that its bitmask (`P_MASK`: an offset into
//     `masks`) does not allow are -inf from the copy on (as if masked last: -inf
//     stays -inf under a finite bias and every penalty).
//  2. Greedy rows: argmax, lowest index on ties (as argmax_rows).
//  3. Random rows: the CPU keeps a prefix of the tokens sorted by weight w = exp((x - max) / T):
//     top-k, then w >= min_p (the best weight is exp(0) = 1), then the shortest prefix whose mass
//     reaches top_p. Every cut is a prefix of one order (x descending, index ascending), so each is
//     a threshold found by a radix select instead of a sort: four passes over the row build
//     256-bin histograms (of counts for top-k, of fixed-point weights for top-p) of the keys that
//     share the prefix chosen so far, and a warp scan of the bins picks the next 8 bits. Ties at
//     the threshold are resolved by a second select on the index (lowest indices first). The draw
//     is then one pass: Gumbel-max, argmax over the kept tokens of log w + G with
//     G = -log(-log U), which picks token i with probability w_i / sum(w) exactly, with U from a
//     counter-based hash of (seed, step, token): a draw depends only on its own sequence, never
//     on its batch position.
//  4. Log-probs under the RAW logits (before bias, penalties and temperature): log-sum-exp in one
//     pass, and the top-L by the same radix select, gathered and bitonic-sorted in shared memory.
//  5. Plugin rows: the top-N (<= 1024) processed logits the same way, instead of a token.
// Cost: a few passes over the row (L2-resident at serving batch sizes); no per-row sort of the
// vocabulary.

#define SAMPLE_THREADS 1024
#define MAX_LIST 1024
// Words of one row's parameters.
#define P_ROW 0
#define P_FLAGS 1
#define P_TEMPERATURE 2
#define P_TOP_K 3
#define P_TOP_P 4
#define P_MIN_P 5
#define P_PRESENCE 6
#define P_FREQUENCY 7
#define P_REPETITION 8
#define P_SEED_LO 9
#define P_SEED_HI 10
#define P_STEP_LO 11
#define P_STEP_HI 12
#define P_BIAS_BEGIN 13
#define P_BIAS_END 14
#define P_PENALTY_BEGIN 15
#define P_PENALTY_END 16
#define P_LOGPROBS 17
#define P_TOP_N 18
#define P_OUT 19
#define P_WORK 20
#define P_MASK 21
#define SAMPLE_PARAM_WORDS 22
#define NO_MASK 0xffffffffu
#define F_GREEDY 1u
#define F_CANDIDATES 2u
#define F_MODIFIED 4u
#define F_LOGPROB 8u
#define F_CHUNKED 16u

struct SampleShared {
    u64 hist[256];
    u64 list[MAX_LIST];
    float red_f[32];
    int red_i[32];
    double red_d[32];
    u32 sel_digit;
    u64 sel_above;
    u64 sel_equal;
    u64 sel_target;
    u32 count;
};

struct Selected {
    u32 key;     // the threshold key
    u64 above;   // weight of the items with a larger key
    u64 equal;   // weight of the items with exactly this key
    u64 target;  // the target the select ran for
};

// Keys that order like the floats (larger float, larger key); -0.0 below +0.0 as total_cmp.
__device__ __forceinline__ u32 order_key(float x) {
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(u32 key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in (0, 1) from (seed, step, token): splitmix64 finalisers chained over the three.
__device__ __forceinline__ float uniform_open(u64 seed, u64 step, u32 token) {
    const u64 h = mix64(mix64(seed ^ mix64(step + 0x9E3779B97F4A7C15ull)) + (u64)token * 0x9E3779B97F4A7C15ull);
    return ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// Weights of the top-p select: w in [0, 1] as fixed point with 31 fraction bits, summed exactly
// in 64 bits (integer adds, so the threshold does not depend on the order of additions).
__device__ __forceinline__ u64 fixed_weight(float w) {
    return __float2ull_rn(w * 2147483648.0f);
}

__device__ __forceinline__ float block_max_f(float v, SampleShared& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) s.red_f[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? s.red_f[lane] : -INFINITY;
    return warp_max(v);
}

__device__ __forceinline__ double block_sum_d(double v, SampleShared& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if (lane == 0) s.red_d[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? s.red_d[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Larger value wins; the lower index on equal values (and `index == 0x7fffffff` means none yet).
__device__ __forceinline__ void argmax_merge(float& best, int& index, float ob, int oi) {
    if (oi != 0x7fffffff && (index == 0x7fffffff || ob > best || (ob == best && oi < index))) { best = ob; index = oi; }
}

// The warp's best (value, index) in every lane.
__device__ __forceinline__ void warp_argmax(float& best, int& index) {
    for (int o = 16; o > 0; o >>= 1) argmax_merge(best, index, __shfl_xor_sync(0xffffffff, best, o), __shfl_xor_sync(0xffffffff, index, o));
}

__device__ __forceinline__ int block_argmax(float best, int index, SampleShared& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(best, index);
    __syncthreads();
    if (lane == 0) { s.red_f[warp] = best; s.red_i[warp] = index; }
    __syncthreads();
    best = lane < (int)(blockDim.x >> 5) ? s.red_f[lane] : -INFINITY;
    index = lane < (int)(blockDim.x >> 5) ? s.red_i[lane] : 0x7fffffff;
    warp_argmax(best, index);
    return index;
}

// Radix select over the items `item(i, key, weight)` accepts among 0..n: the key `t` such that
// the items with keys above `t` weigh less than the target and those with keys >= t reach it.
// With `frac > 0` the target is ceil(frac * total weight), else `target` (clamped to the total).
// Four passes of 8 bits; each builds a histogram of the keys that match the prefix chosen so far.
template <typename Item>
__device__ Selected block_select(int n, u64 target, float frac, Item item, SampleShared& s) {
    u32 prefix = 0, mask = 0;
    u64 above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) s.hist[b] = 0;
        __syncthreads();
        // Most keys share a few top digits (floats of similar magnitude), so lanes with the same
        // digit add their weights first and one of them updates the bin: far fewer atomics on
        // the hot bins. Whole warps iterate (lanes past n take the no-bin digit 256).
        for (int base = 0; base < n; base += blockDim.x) {
            const int i = base + threadIdx.x;
            u32 key = 0, digit = 256;
            u64 w = 0;
            if (i < n && item(i, key, w) && (key & mask) == prefix) digit = (key >> shift) & 255u;
#if __CUDA_ARCH__ >= 800
            // Weights fit 32 bits (fixed_weight <= 2^31; counts are 1): the halves are summed
            // apart so 32 lanes cannot overflow.
            const unsigned peers = __match_any_sync(0xffffffffu, digit);
            const u32 hi = __reduce_add_sync(peers, (u32)(w >> 16)), lo = __reduce_add_sync(peers, (u32)(w & 0xffffu));
            if (digit < 256 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&s.hist[digit], ((u64)hi << 16) + lo);
#else
            if (digit < 256) atomicAdd(&s.hist[digit], w);
#endif
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane l holds digits 255 - 8l down to 248 - 8l: an inclusive scan over lanes walks the
            // digits from the top.
            const int lane = threadIdx.x;
            u64 mine = 0;
            for (int j = 0; j < 8; j++) mine += s.hist[255 - 8 * lane - j];
            u64 incl = mine;
            for (int o = 1; o < 32; o <<= 1) {
                const u64 other = __shfl_up_sync(0xffffffff, incl, o);
                if (lane >= o) incl += other;
            }
            const u64 in_range = __shfl_sync(0xffffffff, incl, 31);
            u64 t;
            if (shift == 24) {
                t = frac > 0.0f ? (u64)ceil((double)frac * (double)in_range) : target;
                if (t < 1) t = 1;
                if (t > in_range) t = in_range;  // an unreachable target keeps everything
            } else {
                t = s.sel_target;
            }
            const unsigned crossing = __ballot_sync(0xffffffff, above + incl >= t);
            const int first = crossing ? __ffs(crossing) - 1 : 31;
            if (lane == first) {
                u64 acc = above + incl - mine;
                int digit = 248 - 8 * lane;
                for (int j = 0; j < 8; j++) {
                    const int d = 255 - 8 * lane - j;
                    if (s.hist[d] > 0 && acc + s.hist[d] >= t) { digit = d; break; }
                    acc += s.hist[d];
                }
                s.sel_digit = (u32)digit;
                s.sel_above = acc;
                s.sel_equal = s.hist[digit];
            }
            if (lane == 0 && shift == 24) s.sel_target = t;
        }
        __syncthreads();
        prefix |= s.sel_digit << shift;
        mask |= 0xffu << shift;
        above = s.sel_above;
    }
    Selected r = {prefix, above, s.sel_equal, s.sel_target};
    __syncthreads();
    return r;
}

// Of the `equal` items with key `tau`, the `need` with the lowest indices are kept: returns the
// largest kept index (all of them when need >= equal). `item` gives keys as for block_select.
template <typename Item>
__device__ u32 tie_cut(int n, u32 tau, u64 need, u64 equal, Item item, SampleShared& s) {
    if (need >= equal) return 0xffffffffu;
    auto at_tau = [&](int i, u32& key, u64& w) {
        u32 k;
        u64 unused;
        if (!item(i, k, unused) || k != tau) return false;
        key = ~(u32)i;  // lower index, larger key
        w = 1;
        return true;
    };
    return ~block_select(n, need, 0.0f, at_tau, s).key;
}

// The `k` largest of values[0..n) (value descending, index ascending), as composite keys
// (order key << 32 | ~index) in s.list[0..k), sorted best first. Returns min(k, n).
__device__ int block_top_list(const float* __restrict__ values, int n, int k, SampleShared& s) {
    k = min(min(k, n), MAX_LIST);
    if (k <= 0) return 0;
    auto item = [&](int i, u32& key, u64& w) {
        key = order_key(values[i]);
        w = 1;
        return true;
    };
    const Selected sel = block_select(n, (u64)k, 0.0f, item, s);
    const u32 cut = tie_cut(n, sel.key, (u64)k - sel.above, sel.equal, item, s);
    int len = 1;
    while (len < k) len <<= 1;
    for (int i = threadIdx.x; i < len; i += blockDim.x) s.list[i] = 0;
    if (threadIdx.x == 0) s.count = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const u32 key = order_key(values[i]);
        if (key > sel.key || (key == sel.key && (u32)i <= cut)) {
            const u32 slot = atomicAdd(&s.count, 1u);
            if (slot < MAX_LIST) s.list[slot] = ((u64)key << 32) | (u64)(~(u32)i);
        }
    }
    // Bitonic sort, descending.
    for (int size = 2; size <= len; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int i = threadIdx.x; i < len; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i) {
                    const u64 a = s.list[i], b = s.list[j];
                    const bool descending = (i & size) == 0;
                    if (descending ? a < b : a > b) { s.list[i] = b; s.list[j] = a; }
                }
            }
        }
    }
    __syncthreads();
    return k;
}

// A random draw from the tempered, top-k / min-p / top-p filtered distribution of x (see above).
__device__ int sample_random(const float* __restrict__ x, int n, const u32* __restrict__ p, SampleShared& s) {
    const float inv_t = 1.0f / __uint_as_float(p[P_TEMPERATURE]);
    const u32 top_k = p[P_TOP_K];
    const float top_p = __uint_as_float(p[P_TOP_P]), min_p = __uint_as_float(p[P_MIN_P]);
    const u64 seed = (u64)p[P_SEED_LO] | ((u64)p[P_SEED_HI] << 32);
    const u64 step = (u64)p[P_STEP_LO] | ((u64)p[P_STEP_HI] << 32);
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max_f(m, s);
    auto weight = [&](int i) { return expf((x[i] - m) * inv_t); };

    // Top-k: the k largest keys (ties at the threshold by lower index).
    const bool use_k = top_k > 0 && top_k < (u32)n;
    u32 k_key = 0, k_cut = 0xffffffffu;
    if (use_k) {
        auto item = [&](int i, u32& key, u64& w) {
            key = order_key(x[i]);
            w = 1;
            return true;
        };
        const Selected sel = block_select(n, top_k, 0.0f, item, s);
        k_key = sel.key;
        k_cut = tie_cut(n, sel.key, (u64)top_k - sel.above, sel.equal, item, s);
    }
    auto in_k = [&](int i, u32 key) { return !use_k || key > k_key || (key == k_key && (u32)i <= k_cut); };
    auto in_min_p = [&](float w) { return !(min_p > 0.0f) || w >= min_p; };

    // Top-p over what top-k and min-p kept: the shortest best-first prefix reaching top_p of
    // their mass.
    const bool use_p = top_p < 1.0f;
    u32 p_key = 0, p_cut = 0xffffffffu;
    if (use_p) {
        auto item = [&](int i, u32& key, u64& w) {
            key = order_key(x[i]);
            if (!in_k(i, key)) return false;
            const float wi = weight(i);
            if (!in_min_p(wi)) return false;
            w = fixed_weight(wi);
            return true;
        };
        const Selected sel = block_select(n, 0, top_p, item, s);
        p_key = sel.key;
        // Items at the threshold weigh the same: keep as many as the target still needs.
        const u64 w_tau = fixed_weight(expf((key_value(sel.key) - m) * inv_t));
        if (w_tau > 0 && sel.target > sel.above) {
            const u64 need = (sel.target - sel.above + w_tau - 1) / w_tau;
            p_cut = tie_cut(n, sel.key, need, sel.equal / w_tau, item, s);
        }
    }

    // Gumbel-max over the kept tokens.
    float best = -INFINITY;
    int index = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const u32 key = order_key(x[i]);
        if (!in_k(i, key)) continue;
        if (!in_min_p(weight(i))) continue;
        if (use_p && !(key > p_key || (key == p_key && (u32)i <= p_cut))) continue;
        const float score = (x[i] - m) * inv_t - logf(-logf(uniform_open(seed, step, (u32)i)));
        argmax_merge(best, index, score, i);
    }
    return block_argmax(best, index, s);
}

// Plain greedy samples (no bias, penalty, mask, log-probs or candidates), which the host marks
// F_CHUNKED (`PAGEDSERVE_GREEDY_CHUNKS`): the largest raw logit, the first on ties, spread over
// the GPU in GREEDY_CHUNK-logit chunks. One 1024-thread block scanning a whole row (sample_rows'
// greedy path, as argmax_rows) is one multiprocessor reading 0.5 MB of an 8B model's 128,256
// logits: argmax_rows took 51.6 us for 32 such rows (ncu, BENCHMARKS.md session 23). A chunk is
// 8 loads a thread, all in flight at once. Grid (chunks, samples): each block writes its chunk's best to
// `partials` (value bits, index), and the block of a sample that arrives last (`arrivals`, one
// counter a sample, zero between launches: the last block resets it) merges them and writes the
// sample's output words as sample_rows would (token, NaN log-prob). Blocks of other samples
// return at once; sample_rows returns at once for these samples.
#define GREEDY_CHUNK 2048
#define GREEDY_THREADS 256
extern "C" __global__ void __launch_bounds__(GREEDY_THREADS) greedy_chunks(
    u32* __restrict__ out,
    u32* __restrict__ partials,
    u32* __restrict__ arrivals,
    const float* __restrict__ logits,
    const u32* __restrict__ params,
    int vocab) {
    PDL_ENTER();
    __shared__ float best_s[GREEDY_THREADS / 32];
    __shared__ int index_s[GREEDY_THREADS / 32];
    __shared__ bool last_s;
    const u32* p = params + (u64)blockIdx.y * SAMPLE_PARAM_WORDS;
    if (p[P_FLAGS] != (F_GREEDY | F_CHUNKED)) return;
    const float* row = logits + (u64)p[P_ROW] * vocab;
    const int begin = blockIdx.x * GREEDY_CHUNK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float values[GREEDY_CHUNK / GREEDY_THREADS];
#pragma unroll
    for (int j = 0; j < GREEDY_CHUNK / GREEDY_THREADS; ++j) {
        const int i = begin + j * GREEDY_THREADS + threadIdx.x;
        values[j] = i < vocab ? row[i] : -INFINITY;
    }
    float best = -INFINITY;
    int index = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < GREEDY_CHUNK / GREEDY_THREADS; ++j) {
        const int i = begin + j * GREEDY_THREADS + threadIdx.x;
        if (i < vocab) argmax_merge(best, index, values[j], i);
    }
    // The block's best into thread 0's (best, index).
    auto block_best = [&]() {
        warp_argmax(best, index);
        __syncthreads();  // the slots' last readers are done
        if (lane == 0) { best_s[warp] = best; index_s[warp] = index; }
        __syncthreads();
        if (threadIdx.x == 0)
            for (int w = 1; w < GREEDY_THREADS / 32; ++w) argmax_merge(best, index, best_s[w], index_s[w]);
    };
    block_best();
    const int chunks = gridDim.x;
    u32* part = partials + 2ull * blockIdx.y * chunks;
    if (threadIdx.x == 0) {
        part[2 * blockIdx.x] = __float_as_uint(best);
        part[2 * blockIdx.x + 1] = (u32)index;
        // The partial is visible to every block before this block is counted.
        __threadfence();
        last_s = atomicAdd(&arrivals[blockIdx.y], 1u) == (u32)chunks - 1;
    }
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    best = -INFINITY;
    index = 0x7fffffff;
    for (int c = threadIdx.x; c < chunks; c += GREEDY_THREADS) {
        // L2 reads: other blocks wrote these after this block's L1 could have seen them.
        argmax_merge(best, index, __uint_as_float(__ldcg(&part[2 * c])), (int)__ldcg(&part[2 * c + 1]));
    }
    block_best();
    if (threadIdx.x == 0) {
        u32* o = out + p[P_OUT];
        o[0] = (u32)index;
        o[1] = 0x7fc00000u;  // NaN: no log-prob asked
        arrivals[blockIdx.y] = 0;
    }
}

// One block per sample. `out` gets, at the row's offset: token (0xffffffff for a plugin row),
// log-prob bits (NaN unless asked), then (token, log-prob) of the top-L raw alternatives, or for
// a plugin row (token, processed logit) of its top-N candidates.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(
    u32* __restrict__ out,
    float* __restrict__ work,
    const float* __restrict__ logits,
    const u32* __restrict__ params,
    const u32* __restrict__ bias_tokens,
    const float* __restrict__ bias_values,
    const u32* __restrict__ penalty_tokens,
    const u32* __restrict__ penalty_counts,
    const u32* __restrict__ masks,
    int vocab) {
    PDL_ENTER();
    __shared__ SampleShared s;
    const u32* p = params + (u64)blockIdx.x * SAMPLE_PARAM_WORDS;
    const u32 flags = p[P_FLAGS];
    if (flags & F_CHUNKED) return;  // greedy_chunks' sample
    const float* raw = logits + (u64)p[P_ROW] * vocab;
    u32* o = out + p[P_OUT];
    const float* x = raw;
    if (flags & F_MODIFIED) {
        float* w = work + (u64)p[P_WORK] * vocab;
        // The mask goes in with the copy: a token it forbids stays -inf through any finite bias
        // and every penalty, so this is the same as masking last, one pass over the row fewer.
        if (p[P_MASK] != NO_MASK) {
            const u32* mask = masks + p[P_MASK];
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                w[i] = ((mask[i >> 5] >> (i & 31)) & 1u) ? raw[i] : -INFINITY;
            }
        } else {
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) w[i] = raw[i];
        }
        __syncthreads();
        for (u32 j = p[P_BIAS_BEGIN] + threadIdx.x; j < p[P_BIAS_END]; j += blockDim.x) {
            w[bias_tokens[j]] = __fadd_rn(w[bias_tokens[j]], bias_values[j]);
        }
        __syncthreads();
        const float rep = __uint_as_float(p[P_REPETITION]);
        const float presence = __uint_as_float(p[P_PRESENCE]), frequency = __uint_as_float(p[P_FREQUENCY]);
        for (u32 j = p[P_PENALTY_BEGIN] + threadIdx.x; j < p[P_PENALTY_END]; j += blockDim.x) {
            const u32 t = penalty_tokens[j], count = penalty_counts[j];
            float l = w[t];
            if (rep != 1.0f) l = l > 0.0f ? __fdiv_rn(l, rep) : __fmul_rn(l, rep);
            if (count > 0 && (presence != 0.0f || frequency != 0.0f)) {
                l = __fsub_rn(l, __fadd_rn(presence, __fmul_rn(frequency, __uint2float_rn(count))));
            }
            w[t] = l;
        }
        __syncthreads();
        x = w;
    }

    if (flags & F_CANDIDATES) {
        const int k = block_top_list(x, vocab, (int)p[P_TOP_N], s);
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            const u32 t = ~(u32)s.list[j];
            o[2 + 2 * j] = t;
            o[3 + 2 * j] = __float_as_uint(x[t]);
        }
        if (threadIdx.x == 0) { o[0] = 0xffffffffu; o[1] = 0x7fc00000u; }
        return;
    }

    const int token = (flags & F_GREEDY) ? [&] {
        float best = -INFINITY;
        int index = 0x7fffffff;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) argmax_merge(best, index, x[i], i);
        return block_argmax(best, index, s);
    }() : sample_random(x, vocab, p, s);

    u32 logprob_bits = 0x7fc00000u;  // NaN: not asked
    if (flags & F_LOGPROB) {
        // log_softmax of the raw row, normalised in double as the CPU does.
        float m = -INFINITY;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, raw[i]);
        m = block_max_f(m, s);
        float sum = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(raw[i] - m);
        const double log_z = (double)m + log(block_sum_d((double)sum, s));
        logprob_bits = __float_as_uint((float)((double)raw[token] - log_z));
        const int k = block_top_list(raw, vocab, (int)p[P_LOGPROBS], s);
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            const u32 t = ~(u32)s.list[j];
            o[2 + 2 * j] = t;
            o[3 + 2 * j] = __float_as_uint((float)((double)raw[t] - log_z));
        }
    }
    if (threadIdx.x == 0) { o[0] = (u32)token; o[1] = logprob_bits; }
}

// Async scheduling: the fed tokens of a batch take the tokens the previous launch sampled, before
// the forward reads them. pairs[2i] is a token's index in the batch, pairs[2i + 1] the word of its
// sample's token in the previous launch's output buffer. A token outside the vocabulary (a sampler
// fault the host fails the request for when it takes the results) goes in as 0, so the embedding
// never reads out of bounds.
extern "C" __global__ void feed_tokens(u32* __restrict__ tokens, const u32* __restrict__ sampled,
                                       const u32* __restrict__ pairs, int n, int vocab) {
    PDL_ENTER();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const u32 token = sampled[pairs[2 * i + 1]];
        tokens[pairs[2 * i]] = token < (u32)vocab ? token : 0u;
    }
}
