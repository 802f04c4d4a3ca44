//! One layer's attention launched on data given from the host, outside a model, through the same
//! `launch_attention` as the forward: the inputs the self-check (`check`) and the kernel
//! benchmark (`bench gpu`) both need, uploaded once.

use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;

use super::launch::{pack_block_tables, plan_attention, AttentionPath, AttentionSplit};
use super::attention::FusedRope;
use super::{launch_attention, AttentionArgs, CudaError, GpuDevice};
use crate::kv_cache::KvCacheDtype;
use crate::model::fp8::{e4m3_bits, e4m3_value};
use crate::runner::ForwardBatch;

pub struct StandaloneAttention {
    q: CudaSlice<bf16>,
    /// The cache layer's keys and values as the kernels read them: bf16 or E4M3 bytes.
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    cache: KvCacheDtype,
    out: CudaSlice<bf16>,
    tables: CudaSlice<u32>,
    token_seq: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    /// The plan's tile words, then its decode rows.
    plan: CudaSlice<u32>,
    num_tiles: usize,
    /// Decode rows: `Some(count)` when listed after the tiles in `plan`, else `None` (every row).
    decode_rows: Option<usize>,
    partials: (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>),
    /// RoPE fused into the decode kernel (`with_fused_rope`): each token's cache slot, the
    /// inverse frequencies, rotary dimensions and magnitude; `q` then holds whole QKV rows.
    rope: Option<(CudaSlice<u32>, CudaSlice<f32>, usize, f32)>,
    /// With RoPE fused, the QKV rows as float32 partials over slices of K (`with_qkv_partials`)
    /// and how many slices, read instead of `q`.
    qkv_partials: Option<(CudaSlice<f32>, usize)>,
    q_stride: usize,
    max_blocks: usize,
    shape: (usize, usize, usize, usize, usize),
    split: AttentionSplit,
    /// The batch's longest context.
    max_context: usize,
    /// Positions a query sees; 0 for all.
    window: usize,
}

impl StandaloneAttention {
    /// `q` is `[tokens, heads, head_dim]`; `k` and `v` are one layer of the cache
    /// (`[blocks, kv_heads, block_size, head_dim]`), stored as `cache` says (E4M3: each value
    /// rounded); the output starts poisoned with NaN. `path` says which kernel takes which tokens;
    /// `splits` is the decode kernel's split-K (its partitions cover the batch's longest context).
    #[allow(clippy::too_many_arguments)]
    pub fn upload(
        dev: &GpuDevice,
        batch: &ForwardBatch,
        q: &[bf16],
        k: &[f32],
        v: &[f32],
        cache: KvCacheDtype,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        path: AttentionPath,
        splits: usize,
    ) -> Result<Self, CudaError> {
        let stream = &dev.stream;
        let n = batch.num_tokens();
        let (tables, max_blocks) = pack_block_tables(batch);
        let plan = plan_attention(batch, path);
        let mut words: Vec<u32> = plan.tile_words().collect();
        words.extend(plan.decode_rows.iter().flatten());
        words.push(0);
        let rows = (n * heads * splits).max(1);
        let max_context = batch.positions.iter().max().map_or(1, |&p| p as usize + 1);
        let encode = |values: &[f32]| -> Vec<u8> {
            match cache {
                KvCacheDtype::Auto => values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
                KvCacheDtype::Fp8E4M3 => values.iter().map(|&x| e4m3_bits(x)).collect(),
            }
        };
        Ok(StandaloneAttention {
            q: stream.clone_htod(q)?,
            k: stream.clone_htod(&encode(k))?,
            v: stream.clone_htod(&encode(v))?,
            cache,
            out: stream.clone_htod(&vec![bf16::NAN; n * heads * head_dim])?,
            tables: stream.clone_htod(&tables)?,
            token_seq: stream.clone_htod(&batch.token_seq)?,
            positions: stream.clone_htod(&batch.positions)?,
            plan: stream.clone_htod(&words)?,
            num_tiles: plan.tiles.len(),
            decode_rows: plan.decode_rows.as_ref().map(Vec::len),
            partials: (
                stream.alloc_zeros::<f32>(rows * head_dim)?,
                stream.alloc_zeros::<f32>(rows)?,
                stream.alloc_zeros::<f32>(rows)?,
            ),
            rope: None,
            qkv_partials: None,
            q_stride: heads * head_dim,
            max_blocks,
            shape: (n, heads, kv_heads, head_dim, batch.block_size),
            split: AttentionSplit::covering(splits, max_context),
            max_context,
            window: 0,
        })
    }

    /// Cut the decode kernel's contexts into `splits` partitions from now on (as
    /// `AttentionSplit::covering` rounds it), at most the `splits` given to `upload`, which sized
    /// the partials.
    pub fn set_splits(&mut self, splits: usize) {
        let (n, heads, ..) = self.shape;
        let split = AttentionSplit::covering(splits, self.max_context);
        assert!(n * heads * split.splits <= self.partials.1.len(), "the partials hold fewer splits than {splits}");
        self.split = split;
    }

    /// The decode kernel's split count now.
    pub fn splits(&self) -> usize {
        self.split.splits
    }

    /// The same attention through a sliding window of `window` positions (0: none); split-K
    /// partitions then cover the window.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        if window > 0 {
            self.split = AttentionSplit::covering(self.split.splits, self.max_context.min(window));
        }
        self
    }

    /// RoPE and the cache write fused into the decode kernel: `q` (as uploaded) holds each token's
    /// unrotated QKV row (`[heads + 2 kv_heads, head_dim]`), every token is its sequence's only
    /// one, and the kernel writes its rotated key and its value to `slots[t]` of the cache.
    pub fn with_fused_rope(mut self, dev: &GpuDevice, slots: &[u32], inv_freq: &[f32], rotary_dim: usize, magnitude: f32) -> Result<Self, CudaError> {
        let (_, heads, kv_heads, head_dim, _) = self.shape;
        self.q_stride = (heads + 2 * kv_heads) * head_dim;
        self.rope = Some((dev.stream.clone_htod(slots)?, dev.stream.clone_htod(inv_freq)?, rotary_dim, magnitude));
        Ok(self)
    }

    /// With RoPE fused, the kernel reads the QKV rows as `splits` float32 partials (split-major,
    /// each `[tokens, q_stride]`, as `gemm::split_k_partials` leaves a product) and sums them,
    /// instead of reading `q`.
    pub fn with_qkv_partials(mut self, dev: &GpuDevice, partials: &[f32], splits: usize) -> Result<Self, CudaError> {
        let tokens = self.shape.0;
        if self.rope.is_none() || splits == 0 || partials.len() != splits * tokens * self.q_stride {
            return Err(CudaError::Config(format!("{} QKV partials for {splits} slices of {tokens} fused-RoPE rows", partials.len())));
        }
        self.qkv_partials = Some((dev.stream.clone_htod(partials)?, splits));
        Ok(self)
    }

    /// The cache after the launch (`[blocks, kv_heads, block_size, head_dim]` each), in float32.
    pub fn cache(&self, dev: &GpuDevice) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let host = |s: &CudaSlice<u8>| -> Result<Vec<f32>, CudaError> {
            let bytes = dev.stream.clone_dtoh(s)?;
            Ok(match self.cache {
                KvCacheDtype::Auto => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                KvCacheDtype::Fp8E4M3 => bytes.iter().map(|&b| e4m3_value(b)).collect(),
            })
        };
        Ok((host(&self.k)?, host(&self.v)?))
    }

    pub fn launch(&self, dev: &GpuDevice) -> Result<(), CudaError> {
        let ptr = |s: &CudaSlice<bf16>| s.device_ptr(&dev.stream).0;
        let ptr8 = |s: &CudaSlice<u8>| s.device_ptr(&dev.stream).0;
        let ptr32 = |s: &CudaSlice<u32>| s.device_ptr(&dev.stream).0;
        let ptrf = |s: &CudaSlice<f32>| s.device_ptr(&dev.stream).0;
        let (num_tokens, num_heads, num_kv_heads, head_dim, block_size) = self.shape;
        let plan = ptr32(&self.plan);
        launch_attention(
            dev,
            &AttentionArgs {
                out: ptr(&self.out),
                q: ptr(&self.q),
                q_stride: self.q_stride,
                k_cache: ptr8(&self.k),
                v_cache: ptr8(&self.v),
                block_tables: ptr32(&self.tables),
                token_seq: ptr32(&self.token_seq),
                positions: ptr32(&self.positions),
                max_blocks: self.max_blocks,
                tiles: plan,
                num_tiles: self.num_tiles,
                decode_rows: if self.decode_rows.is_some() { plan + (self.num_tiles * 3 * 4) as u64 } else { 0 },
                num_decode: self.decode_rows.unwrap_or(num_tokens),
                num_heads,
                num_kv_heads,
                head_dim,
                block_size,
                split: self.split,
                window: self.window,
                scale: 1.0 / (head_dim as f32).sqrt(),
                partials: (ptrf(&self.partials.0), ptrf(&self.partials.1), ptrf(&self.partials.2)),
                defer_merge: false,
                // A live buffer of the right kind (the values cache), so that every check row also
                // runs the prefetch the forward gives its o-projection.
                l2_prefetch: (ptr8(&self.v), self.v.len() / 16 * 16),
                kv_evict_first: dev.kv_evict_first,
                cache: self.cache,
                rope: self.rope.as_ref().map(|(slots, inv_freq, rotary_dim, magnitude)| FusedRope {
                    slots: ptr32(slots),
                    inv_freq: ptrf(inv_freq),
                    position_scale: 1.0,
                    rotary_dim: *rotary_dim,
                    magnitude: *magnitude,
                    qkv_partials: self.qkv_partials.as_ref().map(|(p, splits)| (ptrf(p), *splits, num_tokens * self.q_stride)),
                }),
            },
        )
    }

    /// The attention output, `[tokens, heads, head_dim]`, in float32.
    pub fn output(&self, dev: &GpuDevice) -> Result<Vec<f32>, CudaError> {
        Ok(dev.stream.clone_dtoh(&self.out)?.iter().map(|v| v.to_f32()).collect())
    }
}
