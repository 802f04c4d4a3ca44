//! pagedserve's CUDA kernels, embedded as source so the host can compile them at start-up with
//! NVRTC for whatever GPU it finds (sm_90 on Hopper). Each module is `common.cuh` followed by one
//! `*.cu` file; `source_hash` keys the on-disk cache of compiled modules.

use sha2::{Digest, Sha256};

/// Helpers every module starts with.
pub const COMMON: &str = include_str!("../common.cuh");

/// One compilation unit: a name and its `*.cu` source (without `COMMON`).
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    /// The `extern "C"` kernels it defines.
    pub functions: &'static [&'static str],
}

pub const MODULES: &[KernelModule] = &[
    KernelModule { name: "embedding", source: include_str!("../embedding.cu"), functions: &["embedding_gather", "gather_vocab_ranges"] },
    KernelModule {
        name: "rmsnorm",
        source: include_str!("../rmsnorm.cu"),
        functions: &["fused_add_rmsnorm", "fused_add_rmsnorm_partials", "sum_partials_bf16", "rmsnorm_rows", "rmsnorm_bf16", "head_rmsnorm"],
    },
    KernelModule {
        name: "rope_cache",
        source: include_str!("../rope_cache.cu"),
        functions: &["rope_and_cache", "rope_and_cache_fp8", "add_bias"],
    },
    KernelModule {
        name: "activation",
        source: include_str!("../activation.cu"),
        functions: &["silu_and_mul", "gelu_tanh_and_mul", "softcap_rows"],
    },
    KernelModule {
        name: "ggml",
        source: include_str!("../ggml.cu"),
        functions: &[
            "dequant_ggml",
            "gemv_q4_0_m1",
            "gemv_q4_0_m2",
            "gemv_q4_0_m4",
            "gemv_q4_0_m8",
            "gemv_q4_0_silu_m1",
            "gemv_q4_0_silu_m2",
            "gemv_q4_0_silu_m4",
            "gemv_q4_0_silu_m8",
            "gemv_q4_0_norm_m1",
            "gemv_q4_0_norm_m2",
            "gemv_q4_0_norm_m4",
            "gemv_q4_0_norm_m8",
            "gemv_q4_0_merge_m1",
            "gemv_q4_1_m1",
            "gemv_q4_1_m2",
            "gemv_q4_1_m4",
            "gemv_q4_1_m8",
            "gemv_q4_1_silu_m1",
            "gemv_q4_1_silu_m2",
            "gemv_q4_1_silu_m4",
            "gemv_q4_1_silu_m8",
            "gemv_q4_1_norm_m1",
            "gemv_q4_1_norm_m2",
            "gemv_q4_1_norm_m4",
            "gemv_q4_1_norm_m8",
            "gemv_q4_1_merge_m1",
            "gemv_q8_0_m1",
            "gemv_q8_0_m2",
            "gemv_q8_0_m4",
            "gemv_q8_0_m8",
            "gemv_q8_0_silu_m1",
            "gemv_q8_0_silu_m2",
            "gemv_q8_0_silu_m4",
            "gemv_q8_0_silu_m8",
            "gemv_q8_0_norm_m1",
            "gemv_q8_0_norm_m2",
            "gemv_q8_0_norm_m4",
            "gemv_q8_0_norm_m8",
            "gemv_q8_0_merge_m1",
            "gemv_q4_k_m1",
            "gemv_q4_k_m2",
            "gemv_q4_k_m4",
            "gemv_q4_k_m8",
            "gemv_q4_k_silu_m1",
            "gemv_q4_k_silu_m2",
            "gemv_q4_k_silu_m4",
            "gemv_q4_k_silu_m8",
            "gemv_q4_k_norm_m1",
            "gemv_q4_k_norm_m2",
            "gemv_q4_k_norm_m4",
            "gemv_q4_k_norm_m8",
            "gemv_q4_k_merge_m1",
            "gemv_q4_k_m1_r1",
            "gemv_q4_k_silu_m1_r1",
            "gemv_q4_k_norm_m1_r1",
            "gemv_q5_k_m1",
            "gemv_q5_k_m2",
            "gemv_q5_k_m4",
            "gemv_q5_k_m8",
            "gemv_q5_k_silu_m1",
            "gemv_q5_k_silu_m2",
            "gemv_q5_k_silu_m4",
            "gemv_q5_k_silu_m8",
            "gemv_q5_k_norm_m1",
            "gemv_q5_k_norm_m2",
            "gemv_q5_k_norm_m4",
            "gemv_q5_k_norm_m8",
            "gemv_q5_k_merge_m1",
            "gemv_q6_k_m1",
            "gemv_q6_k_m2",
            "gemv_q6_k_m4",
            "gemv_q6_k_m8",
            "gemv_q6_k_silu_m1",
            "gemv_q6_k_silu_m2",
            "gemv_q6_k_silu_m4",
            "gemv_q6_k_silu_m8",
            "gemv_q6_k_norm_m1",
            "gemv_q6_k_norm_m2",
            "gemv_q6_k_norm_m4",
            "gemv_q6_k_norm_m8",
            "gemv_q6_k_merge_m1",
            "quantize_q8_mmq",
            "mmq_q4_0_t16",
            "mmq_q4_0_t32",
            "mmq_q4_0_t64",
            "mmq_q4_1_t16",
            "mmq_q4_1_t32",
            "mmq_q4_1_t64",
            "mmq_q8_0_t16",
            "mmq_q8_0_t32",
            "mmq_q8_0_t64",
            "mmq_q4_k_t16",
            "mmq_q4_k_t32",
            "mmq_q4_k_t64",
            "mmq_q5_k_t16",
            "mmq_q5_k_t32",
            "mmq_q5_k_t64",
            "mmq_reduce",
        ],
    },
    KernelModule {
        name: "moe",
        source: include_str!("../moe.cu"),
        functions: &["moe_route", "moe_group", "moe_gemm", "moe_combine"],
    },
    KernelModule {
        name: "paged_attention",
        source: include_str!("../paged_attention.cu"),
        functions: &[
            "paged_attention_hd64",
            "paged_attention_hd128",
            "paged_attention_hd256",
            "attention_reduce_hd64",
            "attention_reduce_hd128",
            "attention_reduce_hd256",
            "paged_attention_fp8_hd64",
            "paged_attention_fp8_hd128",
            "paged_attention_fp8_hd256",
        ],
    },
    KernelModule {
        name: "prefill_attention",
        source: include_str!("../prefill_attention.cu"),
        functions: &[
            "prefill_attention_hd64",
            "prefill_attention_hd128",
            "prefill_attention_hd256",
            "prefill_attention_fp8_hd64",
            "prefill_attention_fp8_hd128",
            "prefill_attention_fp8_hd256",
        ],
    },
    KernelModule {
        name: "gemv",
        source: include_str!("../gemv.cu"),
        functions: &[
            "gemv_m1",
            "gemv_m2",
            "gemv_m4",
            "gemv_m8",
            "gemv_silu_m1",
            "gemv_silu_m2",
            "gemv_silu_m4",
            "gemv_silu_m8",
            "gemv_norm_m1",
            "gemv_norm_m2",
            "gemv_norm_m4",
            "gemv_norm_m8",
            "gemv_merge_m1",
            "gemv_fp8_m1",
            "gemv_fp8_m2",
            "gemv_fp8_m4",
            "gemv_fp8_m8",
            "gemv_fp8_silu_m1",
            "gemv_fp8_silu_m2",
            "gemv_fp8_silu_m4",
            "gemv_fp8_silu_m8",
            "gemv_fp8_norm_m1",
            "gemv_fp8_norm_m2",
            "gemv_fp8_norm_m4",
            "gemv_fp8_norm_m8",
            "gemv_fp8_merge_m1",
        ],
    },
    KernelModule { name: "fp8", source: include_str!("../fp8.cu"), functions: &["fp8_quantize_rows", "fp8_scale_output"] },
    KernelModule {
        name: "sampling",
        source: include_str!("../sampling.cu"),
        functions: &["argmax_rows", "init_uniform_bf16", "greedy_chunks", "sample_rows", "feed_tokens"],
    },
    KernelModule {
        name: "skinny",
        source: include_str!("../skinny.cu"),
        functions: &[
            "gemv_mma_n1",
            "gemv_mma_n2",
            "gemv_mma_n4",
            "gemv_mma_n8",
            "gemv_mma_silu_n1",
            "gemv_mma_silu_n2",
            "gemv_mma_silu_n4",
            "gemv_mma_silu_n8",
        ],
    },
];

impl KernelModule {
    /// The full source NVRTC compiles: the common header inlined, then the module.
    pub fn full_source(&self) -> String {
        let common = COMMON.replace("#pragma once", "");
        format!("{common}\n// ---- {}.cu ----\n{}", self.name, self.source)
    }

    /// Hex sha256 of the full source and the target architecture: the compile-cache key.
    pub fn source_hash(&self, arch: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.full_source().as_bytes());
        hasher.update(arch.as_bytes());
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_function_is_defined_extern_c() {
        for module in MODULES {
            for function in module.functions {
                // Plain definitions, or instantiations of a macro: `paged_attention_hd64` and
                // `attention_reduce_hd64` are `DECODE_KERNEL(64, stages)`, `paged_attention_fp8_hd64`
                // `DECODE_FP8_KERNEL(64, stages)`, `prefill_attention_hd128` is `PREFILL_KERNEL(128)`
                // (`_fp8_`: `PREFILL_FP8_KERNEL`),
                // `gemv_silu_m4` is `GEMV_KERNEL(gemv_silu_m4, GEMV_SILU, 4)`.
                let decode_hd = function.strip_prefix("paged_attention_hd").or_else(|| function.strip_prefix("attention_reduce_hd"));
                let instantiated = if let Some(hd) = decode_hd {
                    module.source.contains(&format!("DECODE_KERNEL({hd},"))
                } else if let Some(hd) = function.strip_prefix("paged_attention_fp8_hd") {
                    module.source.contains(&format!("DECODE_FP8_KERNEL({hd},"))
                } else if let Some(hd) = function.strip_prefix("prefill_attention_hd") {
                    module.source.contains(&format!("PREFILL_KERNEL({hd})"))
                } else if let Some(hd) = function.strip_prefix("prefill_attention_fp8_hd") {
                    module.source.contains(&format!("PREFILL_FP8_KERNEL({hd})"))
                } else {
                    // (`_KERNEL_R1(`: the GGUF GEMV's one-row-a-warp variants.)
                    module.source.contains(&format!("_KERNEL({function},")) || module.source.contains(&format!("_KERNEL_R1({function},"))
                };
                let defined = module.source.contains(&format!("{function}(")) || instantiated;
                assert!(defined, "{} does not define {function}", module.name);
            }
            assert!(module.full_source().contains("warp_sum"), "common helpers are prepended");
        }
    }

    #[test]
    fn hash_depends_on_source_and_architecture() {
        let m = MODULES[0];
        assert_eq!(m.source_hash("sm_90"), m.source_hash("sm_90"));
        assert_ne!(m.source_hash("sm_90"), m.source_hash("sm_80"));
        assert_ne!(MODULES[0].source_hash("sm_90"), MODULES[1].source_hash("sm_90"));
    }
}
