//! Every kernel of `kernels/*.cu`, declared once as a typed Rust function: its parameters by
//! name and type, in the source's order, so a launch site names what it passes and cannot pass
//! too few, too many or the wrong kind. Kernels instantiated per head dimension, mode or row
//! count take what selects the instance (`head_dim`, ...) before the launch configuration.
//!
//! `Ptr` is any device address (every pointer parameter); `i32` a C `int`, `u64` a `u64`, `f32`
//! a `float`. A unit test reads the `extern "C" __global__` signatures in the sources and checks
//! each declaration against them.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::LaunchConfig;

use super::launch::{decode_kernel_name, gemv_kernel_name, mmq_kernel_name, prefill_kernel_name, GemvMode, WeightFormat};
use crate::kv_cache::KvCacheDtype;
use crate::model::gguf::GgmlType;
use super::{CudaError, GpuDevice};

/// A device address: any pointer parameter of a kernel.
pub type Ptr = CUdeviceptr;

macro_rules! kernels {
    ($(
        $(#[$doc:meta])*
        fn $rust:ident($($select:ident: $select_ty:ty),*) => $name:expr;
            ($($arg:ident: $ty:ident),* $(,)?)
    )*) => {
        $(
            $(#[$doc])*
            ///
            /// # Safety
            /// Every pointer must address live device memory of the extent the kernel reads and
            /// writes (see its source) for this launch configuration; the launch is enqueued on
            /// `dev`'s stream, after everything enqueued there before.
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $rust(dev: &GpuDevice, $($select: $select_ty,)* config: LaunchConfig, $($arg: $ty),*) -> Result<(), CudaError> {
                let name: String = ($name).into();
                let mut params = [$( (&$arg) as *const $ty as *mut c_void ),*];
                launch(dev, &name, config, &mut params)
            }
        )*

        /// Each declaration's parameter types in order (for the test against the sources).
        #[cfg(test)]
        pub(crate) const DECLARED: &[(&str, &[&str])] = &[$((stringify!($rust), &[$(stringify!($ty)),*])),*];
    };
}

/// Enqueues kernel `name` with `params` (pointers to each argument's value, in order) on `dev`'s
/// stream. With `dev.pdl()`, as a programmatic dependent of the kernel before it: its blocks may
/// start while that kernel's last blocks run, and each waits in `pdl_wait` (`common.cuh`) for the
/// predecessor to finish before it reads activations or writes anything. The GEMV issues its
/// first weight loads before that wait, so the weight stream starts during the previous kernel.
/// Graph capture records the same programmatic edges.
///
/// # Safety
/// `params` must match the kernel's parameter list; see the launchers' contract.
unsafe fn launch(dev: &GpuDevice, name: &str, config: LaunchConfig, params: &mut [*mut c_void]) -> Result<(), CudaError> {
    let function = dev.function(name).cu_function();
    dev.context.bind_to_thread()?;
    let stream = dev.stream.cu_stream();
    let (grid, block) = (config.grid_dim, config.block_dim);
    if dev.pdl_for(name) {
        let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let launch_config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: stream,
            attrs: &mut attribute,
            numAttrs: 1,
        };
        sys::cuLaunchKernelEx(&launch_config, function, params.as_mut_ptr(), std::ptr::null_mut()).result()?;
    } else {
        sys::cuLaunchKernel(
            function,
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            config.shared_mem_bytes,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()?;
    }
    Ok(())
}

kernels! {
    /// `embedding.cu`: `out[t] = table[tokens[t] - first_token] * scale` widened to float32, zeros
    /// for a token outside the table's `table_rows` ids, one block per token.
    fn embedding_gather() => "embedding_gather";
        (out: Ptr, table: Ptr, tokens: Ptr, hidden: i32, scale: f32, first_token: i32, table_rows: i32)
    /// `embedding.cu`: the whole vocabulary's `[rows, vocab]` logits from the all-gather of every
    /// tensor-parallel rank's `[rows, width_r]` range (`per_rank` ids each, the last fewer), one
    /// block per row.
    fn gather_vocab_ranges() => "gather_vocab_ranges";
        (out: Ptr, gathered: Ptr, rows: i32, per_rank: i32, vocab: i32)
    /// `rmsnorm.cu`: `residual += delta` (unless null; scaled by `delta_row_scales[t] *
    /// delta_col_scales[i]` unless the column scales are null: an FP8 GEMM's unscaled output),
    /// `out = rmsnorm(residual) * weight` (unless null), one block per token.
    fn fused_add_rmsnorm() => "fused_add_rmsnorm";
        (residual: Ptr, delta: Ptr, delta_row_scales: Ptr, delta_col_scales: Ptr, weight: Ptr, out: Ptr, hidden: i32, eps: f32)
    /// `rmsnorm.cu`: `fused_add_rmsnorm` of a delta in `splits` float32 partial products (split-K
    /// slices, `split_stride` floats apart, row t at `t * hidden`), summed in split order.
    fn fused_add_rmsnorm_partials() => "fused_add_rmsnorm_partials";
        (residual: Ptr, partials: Ptr, splits: i32, split_stride: u64, weight: Ptr, out: Ptr, hidden: i32, eps: f32)
    /// `rmsnorm.cu`: `out[i] = bf16(sum of the splits' partials[s * split_stride + i])`, grid-stride.
    fn sum_partials_bf16() => "sum_partials_bf16";
        (out: Ptr, partials: Ptr, splits: i32, split_stride: u64, elements: u64)
    /// `rmsnorm.cu`: `out[i] = rmsnorm(residual[rows[i]]) * weight`, one block per row.
    fn rmsnorm_rows() => "rmsnorm_rows";
        (residual: Ptr, rows: Ptr, weight: Ptr, out: Ptr, hidden: i32, eps: f32)
    /// `rmsnorm.cu`: `out = rmsnorm(x) * weight` of bfloat16 rows, one block per row.
    fn rmsnorm_bf16() => "rmsnorm_bf16";
        (x: Ptr, weight: Ptr, out: Ptr, hidden: i32, eps: f32)
    /// `rmsnorm.cu`: per-head RMSNorm in place; grid (rows, heads / 4), 128 threads.
    fn head_rmsnorm() => "head_rmsnorm";
        (x: Ptr, weight: Ptr, row_width: i32, first_head: i32, num_heads: i32, head_dim: i32, eps: f32)
    /// `rope_cache.cu`: RoPE on the query and key heads of `qkv` in place, keys and values into
    /// the cache slots (bf16, or E4M3 bytes in an FP8 cache), one block per token.
    fn rope_and_cache(cache: KvCacheDtype) => match cache { KvCacheDtype::Auto => "rope_and_cache", KvCacheDtype::Fp8E4M3 => "rope_and_cache_fp8" };
        (qkv: Ptr, positions: Ptr, slots: Ptr, inv_freq: Ptr, k_cache: Ptr, v_cache: Ptr, num_heads: i32,
         num_kv_heads: i32, head_dim: i32, block_size: i32, position_scale: f32, interleaved: i32,
         rotary_dim: i32, magnitude: f32)
    /// `rope_cache.cu`: `x[r] += bias` in bfloat16, one block per row.
    fn add_bias() => "add_bias";
        (x: Ptr, bias: Ptr, cols: i32)
    /// `activation.cu`: `out = silu(gate) * up` of `[gate | up]` rows (each value scaled by
    /// `row_scales[t] * col_scales[c]` first unless the column scales are null: an FP8 GEMM's
    /// unscaled output); grid `launch::gated_config`.
    fn silu_and_mul() => "silu_and_mul";
        (out: Ptr, gate_up: Ptr, row_scales: Ptr, col_scales: Ptr, inter: i32)
    /// `activation.cu`: `out = gelu_tanh(gate) * up`, as `silu_and_mul`.
    fn gelu_tanh_and_mul() => "gelu_tanh_and_mul";
        (out: Ptr, gate_up: Ptr, row_scales: Ptr, col_scales: Ptr, inter: i32)
    /// `activation.cu`: `x = cap * tanh(x / cap)` in place, one block per row.
    fn softcap_rows() => "softcap_rows";
        (x: Ptr, cols: i32, cap: f32)
    /// `moe.cu`: each token's top-k experts and weights from its router logits, one warp per
    /// token.
    fn moe_route() => "moe_route";
        (logits: Ptr, ids: Ptr, weights: Ptr, num_tokens: i32, experts: i32, k: i32, norm_topk: i32)
    /// `dequant.cu`: `rows` rows of ggml blocks of `ty` expanded to bf16, Q/K rows put back in
    /// Hugging Face's order when `qk_head_dim` > 0; a grid-stride loop, one thread per block.
    fn dequant_ggml() => "dequant_ggml";
        (out: Ptr, input: Ptr, ty: i32, rows: i32, cols: i32, qk_head_dim: i32)
    /// `ggml.cu`: `m` bf16 rows of `k` quantized to int8 per 32 values for MMQ, padded with zero
    /// rows to `tokens`; grid-stride, one thread per 8 values.
    fn quantize_q8_mmq() => "quantize_q8_mmq";
        (xq: Ptr, xd: Ptr, xs: Ptr, x: Ptr, m: i32, k: i32, tokens: i32)
    /// `ggml.cu`: `out[m, n] = x · Wᵀ` from `ty` blocks and the quantized input; grid (64-row
    /// blocks, splits of k of `split_sbs` super-blocks), float partials when split.
    fn mmq(ty: GgmlType, m_rows: usize) => mmq_kernel_name(ty, m_rows);
        (out: Ptr, out_f32: i32, partial: Ptr, xq: Ptr, xd: Ptr, xs: Ptr, w: Ptr, m: i32, n: i32, k: i32, split_sbs: i32)
    /// `ggml.cu`: `out` = the sum of `splits` float partials of `count` values each; grid-stride.
    fn mmq_reduce() => "mmq_reduce";
        (out: Ptr, out_f32: i32, partial: Ptr, count: i32, splits: i32)
    /// `moe.cu`: the assignments grouped by expert and cut into tiles; one block of 1024.
    fn moe_group() => "moe_group";
        (ids: Ptr, assignments: i32, experts: i32, offsets: Ptr, sorted: Ptr, tiles: Ptr)
    /// `moe.cu`: the grouped expert product; grid (column tiles, most tiles), `MOE_THREADS`.
    fn moe_gemm() => "moe_gemm";
        (out: Ptr, input: Ptr, w: Ptr, sorted: Ptr, tiles: Ptr, num_tiles: Ptr, in_div: i32, n: i32, k: i32)
    /// `moe.cu`: each token's expert outputs summed with their weights, one block per token.
    fn moe_combine() => "moe_combine";
        (out: Ptr, y: Ptr, weights: Ptr, k: i32, hidden: i32)
    /// `paged_attention.cu`: decode attention over the paged cache, instantiated per head
    /// dimension and cache type; grid (rows, KV heads, splits); `window` 0 sees every earlier position; RoPE and
    /// the cache write fused when `inv_freq` is not null, reading the QKV product's `qkv_splits`
    /// float32 partials (`qkv_split_stride` apart) instead of `q` when `qkv_partials` is not null;
    /// `l2_prefetch_bytes` of the next product's
    /// weights from `l2_prefetch` pulled into L2 (0: none); the cache read under an evict-first
    /// L2 policy when `kv_evict_first` is not 0.
    fn paged_attention(head_dim: usize, cache: KvCacheDtype) => decode_kernel_name(head_dim, cache);
        (out: Ptr, part_out: Ptr, part_max: Ptr, part_sum: Ptr, q: Ptr, k_cache: Ptr, v_cache: Ptr,
         block_tables: Ptr, token_seq: Ptr, positions: Ptr, rows: Ptr, q_stride: i32, max_blocks: i32,
         num_heads: i32, num_kv_heads: i32, block_size: i32, scale: f32, partition: i32, window: i32,
         slots: Ptr, inv_freq: Ptr, position_scale: f32, rotary_dim: i32, magnitude: f32, qkv_partials: Ptr,
         qkv_splits: i32, qkv_split_stride: u64, l2_prefetch: Ptr, l2_prefetch_bytes: u64, kv_evict_first: i32)
    /// `paged_attention.cu`: merges split-K partials, instantiated per head dimension; grid
    /// (rows, KV heads), a warp per query head.
    fn attention_reduce(head_dim: usize) => format!("attention_reduce_hd{head_dim}");
        (out: Ptr, part_out: Ptr, part_max: Ptr, part_sum: Ptr, rows: Ptr, num_splits: i32, num_heads: i32, num_kv_heads: i32)
    /// `prefill_attention.cu`: flash attention of prefill tiles over the paged cache,
    /// instantiated per head dimension and cache type; grid (heads, tiles); `window` 0 sees every earlier
    /// position.
    fn prefill_attention(head_dim: usize, cache: KvCacheDtype) => prefill_kernel_name(head_dim, cache);
        (out: Ptr, q: Ptr, k_cache: Ptr, v_cache: Ptr, block_tables: Ptr, positions: Ptr, tiles: Ptr,
         q_stride: i32, max_blocks: i32, num_heads: i32, num_kv_heads: i32, block_size: i32, scale: f32, window: i32)
    /// `gemv.cu`: small-batch products with their input staging, instantiated per staging mode,
    /// padded row count and weight format (and `suffix`: "_r1" for `ggml.cu`'s one-row-a-warp
    /// Q4_K kernels, else ""); `w_scale` is FP8's per-row scales (ignored in bf16).
    fn gemv(mode: GemvMode, m_rows: usize, format: WeightFormat, suffix: &str) => format!("{}{suffix}", gemv_kernel_name(mode, m_rows, format));
        (out: Ptr, out_f32: i32, x: Ptr, delta: Ptr, norm_w: Ptr, residual_out: Ptr, rows: Ptr, bias: Ptr,
         w: Ptr, w_scale: Ptr, m: i32, n: i32, k: i32, eps: f32, splits: i32, head_dim: i32)
    /// `skinny.cu`: a bf16 product of up to 64 input rows on the tensor cores, instantiated per
    /// tiles of 8 rows and input (plain, or SiLU-and-multiply of gate_up rows); grid (row groups,
    /// splits of K) (see `cuda::skinny`).
    fn gemv_mma(tiles: usize, silu: bool) => super::skinny::kernel_name(tiles, silu);
        (out: Ptr, out_f32: i32, x: Ptr, w: Ptr, partials: Ptr, arrivals: Ptr, m: i32, n: i32, k: i32, k_per_split: i32)
    /// `fp8.cu`: each row of a bf16 `[rows, cols]` matrix to E4M3 with its scale; one block a row.
    fn fp8_quantize_rows() => "fp8_quantize_rows";
        (q: Ptr, scales: Ptr, x: Ptr, cols: i32)
    /// `fp8.cu`: `out[r, c] *= row_scales[r] * col_scales[c]`; one block a row.
    fn fp8_scale_output() => "fp8_scale_output";
        (out: Ptr, row_scales: Ptr, col_scales: Ptr, n: i32)
    /// `sampling.cu`: the index of each row's largest logit, one block per row.
    fn argmax_rows() => "argmax_rows";
        (out: Ptr, logits: Ptr, vocab: i32)
    /// `sampling.cu`: `n` bfloat16 values uniform in `[-scale, scale)` from `seed`.
    fn init_uniform_bf16() => "init_uniform_bf16";
        (out: Ptr, n: u64, seed: u64, scale: f32)
    /// `sampling.cu`: the plain greedy samples' tokens, chunks of a row over the GPU; grid
    /// (chunks, samples) (see `cuda::sampling`).
    fn greedy_chunks() => "greedy_chunks";
        (out: Ptr, partials: Ptr, arrivals: Ptr, logits: Ptr, params: Ptr, vocab: i32)
    /// `sampling.cu`: the full sampler, one block per sample (see `cuda::sampling`).
    fn sample_rows() => "sample_rows";
        (out: Ptr, work: Ptr, logits: Ptr, params: Ptr, bias_tokens: Ptr, bias_values: Ptr,
         penalty_tokens: Ptr, penalty_counts: Ptr, masks: Ptr, vocab: i32)
    /// `sampling.cu`: fed tokens from the previous launch's samples (async scheduling).
    fn feed_tokens() => "feed_tokens";
        (tokens: Ptr, sampled: Ptr, pairs: Ptr, n: i32, vocab: i32)
}

#[cfg(test)]
mod tests {
    use super::DECLARED;

    /// The parameter list of `kernel` in the sources: the text between the parentheses after
    /// `{cuda_name}(` in `file`, with `#define`d parameter lists expanded (`PARAMS` or, taking the
    /// cache's element type, `PARAMS(T)`: the body as written, since only pointers use `T`).
    fn source_params(file: &str, cuda_name: &str) -> Vec<String> {
        let source = pagedserve_kernels::MODULES
            .iter()
            .find(|m| m.name == file)
            .unwrap_or_else(|| panic!("no kernel module {file}"))
            .full_source();
        let at = source.find(&format!("{cuda_name}(")).unwrap_or_else(|| panic!("`{cuda_name}(` is not in {file}")) + cuda_name.len() + 1;
        let end = at + source[at..].find(')').unwrap();
        let mut params = source[at..end].replace('\\', " ");
        let define = params.trim().to_string();
        let (name, argument) = match define.split_once('(') {
            Some((name, _)) => (name.to_string(), true),
            None => (define.clone(), false),
        };
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            let key = if argument { format!("#define {name}(") } else { format!("#define {name}") };
            let mut start = source.find(&key).unwrap_or_else(|| panic!("no `{key}` in {file}")) + key.len();
            if argument {
                start += source[start..].find(')').unwrap() + 1;
            }
            let stop = start + source[start..].find("\n#define").unwrap();
            params = source[start..stop].replace('\\', " ");
        }
        params
            .split(',')
            .map(|p| {
                let p = p.trim();
                if p.contains('*') {
                    "Ptr".to_string()
                } else {
                    match p.split_whitespace().next().unwrap_or_default() {
                        "int" => "i32".to_string(),
                        "float" => "f32".to_string(),
                        "u64" => "u64".to_string(),
                        other => panic!("unexpected parameter type `{other}` in `{cuda_name}` ({p})"),
                    }
                }
            })
            .collect()
    }

    #[test]
    fn every_declaration_matches_its_kernel_signature() {
        // Where each declared kernel is defined (instantiated kernels: their template's name).
        let sources = [
            ("embedding_gather", "embedding", "embedding_gather"),
            ("gather_vocab_ranges", "embedding", "gather_vocab_ranges"),
            ("fused_add_rmsnorm", "rmsnorm", "fused_add_rmsnorm"),
            ("fused_add_rmsnorm_partials", "rmsnorm", "fused_add_rmsnorm_partials"),
            ("sum_partials_bf16", "rmsnorm", "sum_partials_bf16"),
            ("rmsnorm_rows", "rmsnorm", "rmsnorm_rows"),
            ("rmsnorm_bf16", "rmsnorm", "rmsnorm_bf16"),
            ("head_rmsnorm", "rmsnorm", "head_rmsnorm"),
            ("rope_and_cache", "rope_cache", "rope_and_cache"),
            ("add_bias", "rope_cache", "add_bias"),
            ("silu_and_mul", "activation", "silu_and_mul"),
            ("gelu_tanh_and_mul", "activation", "gelu_tanh_and_mul"),
            ("softcap_rows", "activation", "softcap_rows"),
            ("moe_route", "moe", "moe_route"),
            ("dequant_ggml", "ggml", "dequant_ggml"),
            ("quantize_q8_mmq", "ggml", "quantize_q8_mmq"),
            ("mmq", "ggml", "MMQ_FN"),
            ("mmq_reduce", "ggml", "mmq_reduce"),
            ("moe_group", "moe", "moe_group"),
            ("moe_gemm", "moe", "moe_gemm"),
            ("moe_combine", "moe", "moe_combine"),
            ("paged_attention", "paged_attention", "paged_attention_hd##HD"),
            ("attention_reduce", "paged_attention", "attention_reduce_hd##HD"),
            ("prefill_attention", "prefill_attention", "prefill_attention_hd##HD"),
            ("gemv", "gemv", "NAME"),
            ("gemv_mma", "skinny", "NAME"),
            ("argmax_rows", "sampling", "argmax_rows"),
            ("init_uniform_bf16", "sampling", "init_uniform_bf16"),
            ("greedy_chunks", "sampling", "greedy_chunks"),
            ("sample_rows", "sampling", "sample_rows"),
            ("feed_tokens", "sampling", "feed_tokens"),
            ("fp8_quantize_rows", "fp8", "fp8_quantize_rows"),
            ("fp8_scale_output", "fp8", "fp8_scale_output"),
        ];
        assert_eq!(sources.len(), DECLARED.len(), "every declared kernel has a source here");
        for (rust, types) in DECLARED {
            let (_, file, cuda_name) = sources.iter().find(|(r, _, _)| r == rust).unwrap_or_else(|| panic!("{rust}: no source listed"));
            let want = source_params(file, cuda_name);
            assert_eq!(types.iter().map(|t| t.to_string()).collect::<Vec<_>>(), want, "{rust}");
        }
    }
}
