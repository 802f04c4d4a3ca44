// The vocabulary's kernels: the embedding gather that starts a forward, and (tensor parallelism)
// putting together the logits of ranks that each scored one range of the vocabulary.

// Embedding gather: the residual stream (float32) of each token is its row of the bf16 table,
// times `scale` (Gemma's sqrt(hidden); 1 for most models). The table holds the `table_rows` token
// ids from `first_token` (a tensor-parallel rank's range; the whole vocabulary from 0 otherwise):
// a token outside it embeds as zeros, for the ranks' sum to fill in.
extern "C" __global__ void embedding_gather(float* __restrict__ out, const __nv_bfloat16* __restrict__ table,
                                            const u32* __restrict__ tokens, int hidden, float scale,
                                            int first_token, int table_rows) {
    PDL_ENTER();
    const int t = blockIdx.x;
    // Unsigned, so a token below `first_token` wraps past `table_rows` too.
    const u32 local = tokens[t] - (u32)first_token;
    float* o = out + (u64)t * hidden;
    if (local >= (u32)table_rows) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = 0.0f;
        return;
    }
    const __nv_bfloat16* row = table + (u64)local * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __bfloat162float(row[i]) * scale;
}

// The whole vocabulary's logits `out [rows, vocab]` from an all-gather of every rank's range:
// rank r's `[rows, width_r]` logits sit at `gathered + r * rows * per_rank`, where each rank has
// `per_rank` ids (the last possibly fewer: `width_r = min(per_rank, vocab - r * per_rank)`). One
// block per row.
extern "C" __global__ void gather_vocab_ranges(float* __restrict__ out, const float* __restrict__ gathered,
                                               int rows, int per_rank, int vocab) {
    PDL_ENTER();
    const int row = blockIdx.x;
    for (int col = threadIdx.x; col < vocab; col += blockDim.x) {
        const int r = col / per_rank;
        const int first = r * per_rank;
        const int width = min(per_rank, vocab - first);
        out[(u64)row * vocab + col] = gathered[(u64)r * rows * per_rank + (u64)row * width + (col - first)];
    }
}
