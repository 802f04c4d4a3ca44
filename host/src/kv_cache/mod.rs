//! The paged KV cache's bookkeeping: the layout every backend stores keys and values in, the pool
//! of physical blocks that sequences' block tables point into, and the manager that hands them out.
//!
//! Layout contract (shared by the CPU and GPU backends): per layer, one key array and one value
//! array of shape `[num_blocks, num_kv_heads, block_size, head_dim]`. Token `t` of a sequence
//! lives in block `block_table[t / block_size]` at offset `t % block_size`; its *slot* is
//! `block * block_size + offset`.

mod block_pool;
mod manager;

pub use self::block_pool::{BlockHash, BlockId, BlockPool};
pub use self::manager::{KvCacheManager, PrefixCacheStats, SeqBlocks};

/// Default number of tokens per block, as in vLLM.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// What the cache stores each key and value as (`serve --kv-cache-dtype`, vLLM's flag and names).
/// The layout is the same for every type; only the bytes a value takes change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The backend's activation type: float32 on the CPU, bfloat16 on the GPU.
    #[default]
    Auto,
    /// E4M3, one byte a value: `e4m3(x / scale)`, read back as `byte · scale`, with one scale
    /// for keys and one for values (`KV_FP8_SCALE`). Half of bfloat16's bytes, so a decode step
    /// that is bound by reading the cache reads half as much, and twice the tokens fit.
    Fp8E4M3,
}

/// The scale of keys and of values in an FP8 cache. vLLM's default when a checkpoint brings no
/// `k_scale`/`v_scale`: values up to E4M3's ±448 are kept, larger ones saturate. (Keys and values
/// of the Llama-family models sit well inside that range; a model whose cache values do not
/// would need calibrated scales, which are not read yet.)
pub const KV_FP8_SCALE: f32 = 1.0;

impl KvCacheDtype {
    /// Bytes one key or value element takes, given the backend's own element size.
    pub fn bytes_per_value(self, native: usize) -> usize {
        match self {
            KvCacheDtype::Auto => native,
            KvCacheDtype::Fp8E4M3 => 1,
        }
    }

    /// The flag's canonical spelling.
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Fp8E4M3 => "fp8_e4m3",
        }
    }
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KvCacheDtype::Auto),
            "fp8" | "fp8_e4m3" => Ok(KvCacheDtype::Fp8E4M3),
            "fp8_e5m2" => Err("fp8_e5m2 is not supported: the FP8 cache is E4M3 (fp8, fp8_e4m3)".into()),
            other => Err(format!("unknown KV cache type {other:?}: expected auto, fp8 or fp8_e4m3")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheLayout {
    /// The layout of `config`'s cache with `num_blocks` blocks of `block_size` tokens.
    pub fn for_model(config: &crate::model::ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        KvCacheLayout {
            num_layers: config.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        }
    }

    /// Floats in one layer's key (or value) array.
    pub fn layer_len(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Index of the first float of (`slot`, `kv_head`) in a layer's array.
    #[inline]
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        let (block, in_block) = (slot / self.block_size, slot % self.block_size);
        ((block * self.num_kv_heads + kv_head) * self.block_size + in_block) * self.head_dim
    }

    /// Bytes one block takes over all layers, keys and values, at `bytes_per_value`.
    pub fn block_bytes(&self, bytes_per_value: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * bytes_per_value
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_the_layout_contract() {
        let layout = KvCacheLayout { num_layers: 2, num_blocks: 4, block_size: 16, num_kv_heads: 3, head_dim: 8 };
        assert_eq!(layout.layer_len(), 4 * 3 * 16 * 8);
        assert_eq!(layout.offset(0, 0), 0);
        assert_eq!(layout.offset(1, 0), 8);
        assert_eq!(layout.offset(0, 1), 16 * 8);
        // Slot 17 is block 1, offset 1.
        assert_eq!(layout.offset(17, 2), ((3 + 2) * 16 + 1) * 8);
        assert_eq!(layout.blocks_for(0), 0);
        assert_eq!(layout.blocks_for(16), 1);
        assert_eq!(layout.blocks_for(17), 2);
    }

    #[test]
    fn cache_types_parse_as_vllm_names_them() {
        assert_eq!("auto".parse(), Ok(KvCacheDtype::Auto));
        assert_eq!("fp8".parse(), Ok(KvCacheDtype::Fp8E4M3));
        assert_eq!("fp8_e4m3".parse(), Ok(KvCacheDtype::Fp8E4M3));
        assert!("fp8_e5m2".parse::<KvCacheDtype>().unwrap_err().contains("E4M3"));
        assert!("int8".parse::<KvCacheDtype>().unwrap_err().contains("\"int8\""));
        assert_eq!(KvCacheDtype::Fp8E4M3.bytes_per_value(2), 1);
        assert_eq!(KvCacheDtype::Auto.bytes_per_value(4), 4);
        assert_eq!(KvCacheDtype::Fp8E4M3.name().parse(), Ok(KvCacheDtype::Fp8E4M3));
    }
}
