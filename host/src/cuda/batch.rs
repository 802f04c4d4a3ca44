//! Per-batch device state of the forward: the activation arena and other buffers (`Scratch`, grown
//! to the largest batch seen) and the batch's index arrays (token ids, positions, slots, block tables, logits
//! rows, attention tiles), packed into one buffer and uploaded once per step (`upload_batch`).

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, PinnedHostSlice};
use half::bf16;

use super::launch::{pack_block_tables, AttentionPlan, SPLIT_K_MAX_ROWS, SPLIT_K_MAX_SLICES};
use super::model::ptr;
use super::{CudaError, GpuDevice};
use crate::model::ModelConfig;
use crate::runner::ForwardBatch;

/// Per-batch buffers, grown to the largest batch seen: the activation arena's slots (see
/// `cuda::forward`), the final norm's rows, the logits, split-K partials and the index buffer.
#[derive(Default)]
pub(crate) struct Scratch {
    capacity_tokens: usize,
    capacity_rows: usize,
    capacity_partials: usize,
    /// Bytes per token of each arena slot (the model's `forward::plan`).
    slot_bytes: Vec<usize>,
    slots: Vec<CudaSlice<u8>>,
    pub(crate) final_h: Option<CudaSlice<bf16>>,
    pub(crate) logits: Option<CudaSlice<f32>>,
    /// Floats per logits row of a tensor-parallel all-gather (every rank's padded vocabulary
    /// range, `cuda::collective`), 0 for a whole model; and the buffer they land in.
    gathered_width: usize,
    gathered: Option<CudaSlice<f32>>,
    pub(crate) part_out: Option<CudaSlice<f32>>,
    pub(crate) part_max: Option<CudaSlice<f32>>,
    pub(crate) part_sum: Option<CudaSlice<f32>>,
    /// Every index array of a batch, packed, so a step makes one upload into one allocation.
    pub(crate) indices: Option<CudaSlice<u32>>,
    pub(crate) capacity_indices: usize,
    /// The widest input of an FP8 product (0 without FP8 weights): what `fp8_input` holds per
    /// token, quantized for cuBLASLt (`cuda::fp8_gemm`), with a scale per token in `fp8_scales`.
    fp8_width: usize,
    fp8_input: Option<CudaSlice<u8>>,
    fp8_scales: Option<CudaSlice<f32>>,
    /// The bf16 tile quantized GGUF weights are dequantized into for products of more rows than the GEMV takes
    /// (`gemm::ggml_linear`); 0 elements without quantized GGUF weights.
    ggml_tile_elements: usize,
    ggml_tile: Option<CudaSlice<bf16>>,
    /// A split product's float32 partials (`gemm::split_k_partials`): `SPLIT_K_MAX_SLICES` blocks of
    /// up to `SPLIT_K_MAX_ROWS` rows of the hidden size or of the QKV width, the wider.
    product_partials: Option<CudaSlice<f32>>,
}

impl Scratch {
    /// An arena with the slots of `plan` (bytes per token each), allocated on first `ensure`.
    pub(crate) fn new(plan: &[usize], fp8_width: usize, ggml_tile_elements: usize, gathered_width: usize) -> Self {
        Scratch { slot_bytes: plan.to_vec(), fp8_width, ggml_tile_elements, gathered_width, ..Default::default() }
    }

    /// Grows the buffers to hold `tokens` tokens, `rows` logits rows and `partials` split-K rows.
    pub(crate) fn ensure(&mut self, dev: &GpuDevice, c: &ModelConfig, tokens: usize, rows: usize, partials: usize) -> Result<(), CudaError> {
        let s = self;
        if tokens > s.capacity_tokens {
            let t = tokens.next_power_of_two();
            let partial_width = c.hidden_size.max(c.qkv_size());
            s.slots.clear();
            for &bytes in &s.slot_bytes {
                s.slots.push(dev.stream.alloc_zeros(t * bytes)?);
            }
            if s.fp8_width > 0 {
                s.fp8_input = Some(dev.stream.alloc_zeros(t * s.fp8_width)?);
                s.fp8_scales = Some(dev.stream.alloc_zeros(t)?);
            }
            if s.ggml_tile_elements > 0 && s.ggml_tile.is_none() {
                s.ggml_tile = Some(dev.stream.alloc_zeros(s.ggml_tile_elements)?);
            }
            s.product_partials = Some(dev.stream.alloc_zeros(SPLIT_K_MAX_SLICES * t.min(SPLIT_K_MAX_ROWS) * partial_width)?);
            s.capacity_tokens = t;
        }
        if rows > s.capacity_rows {
            let r = rows.next_power_of_two();
            s.final_h = Some(dev.stream.alloc_zeros(r * c.hidden_size)?);
            s.logits = Some(dev.stream.alloc_zeros(r * c.vocab_size)?);
            if s.gathered_width > 0 {
                s.gathered = Some(dev.stream.alloc_zeros(r * s.gathered_width)?);
            }
            s.capacity_rows = r;
        }
        if partials > s.capacity_partials {
            let p = partials.next_power_of_two();
            s.part_out = Some(dev.stream.alloc_zeros(p * c.head_dim)?);
            s.part_max = Some(dev.stream.alloc_zeros(p)?);
            s.part_sum = Some(dev.stream.alloc_zeros(p)?);
            s.capacity_partials = p;
        }
        Ok(())
    }

    pub(crate) fn slot_bytes(&self) -> &[usize] {
        &self.slot_bytes
    }

    pub(crate) fn slot_ptr(&self, dev: &GpuDevice, slot: usize) -> CUdeviceptr {
        ptr(dev, &self.slots[slot])
    }

    pub(crate) fn logits_ptr(&self, dev: &GpuDevice) -> CUdeviceptr {
        self.logits.as_ref().map_or(0, |l| ptr(dev, l))
    }

    /// Where a tensor-parallel all-gather puts every rank's logits (0 for a whole model).
    pub(crate) fn gathered_ptr(&self, dev: &GpuDevice) -> CUdeviceptr {
        self.gathered.as_ref().map_or(0, |g| ptr(dev, g))
    }

    /// Room for an FP8 product's quantized input and its scales, if the model has FP8 weights.
    pub(crate) fn fp8_input(&self, dev: &GpuDevice) -> Option<(CUdeviceptr, CUdeviceptr)> {
        Some((ptr(dev, self.fp8_input.as_ref()?), ptr(dev, self.fp8_scales.as_ref()?)))
    }

    /// The GGUF dequantization tile and its elements, if the model has quantized GGUF weights.
    pub(crate) fn ggml_tile(&self, dev: &GpuDevice) -> Option<(CUdeviceptr, usize)> {
        Some((ptr(dev, self.ggml_tile.as_ref()?), self.ggml_tile_elements))
    }

    /// Room for a split product's partials of `floats` values, if the scratch has that much.
    pub(crate) fn product_partials(&self, dev: &GpuDevice, floats: usize) -> Option<CUdeviceptr> {
        self.product_partials.as_ref().filter(|p| p.len() >= floats).map(|p| ptr(dev, p))
    }

    /// Whether `product_partials` has room for `floats`.
    pub(crate) fn holds_product_partials(&self, floats: usize) -> bool {
        self.product_partials.as_ref().is_some_and(|p| p.len() >= floats)
    }

    pub(crate) fn final_h_ptr(&self, dev: &GpuDevice) -> CUdeviceptr {
        self.final_h.as_ref().map_or(0, |f| ptr(dev, f))
    }

    /// The split-K partials: outputs, maxima, sums.
    pub(crate) fn partials(&self, dev: &GpuDevice) -> (CUdeviceptr, CUdeviceptr, CUdeviceptr) {
        let p = |slice: &Option<CudaSlice<f32>>| slice.as_ref().map_or(0, |s| ptr(dev, s));
        (p(&self.part_out), p(&self.part_max), p(&self.part_sum))
    }
}

/// Device pointers to the batch's index arrays (all inside one index buffer).
pub(crate) struct BatchArrays {
    pub tokens: CUdeviceptr,
    pub positions: CUdeviceptr,
    pub slots: CUdeviceptr,
    pub token_seq: CUdeviceptr,
    pub block_tables: CUdeviceptr,
    pub rows: CUdeviceptr,
    pub max_blocks: usize,
    /// Prefill attention tiles (`AttentionPlan::tiles`, 3 words each) and their count.
    pub tiles: CUdeviceptr,
    pub num_tiles: usize,
    /// Token rows of the decode attention kernel, or 0 for rows `0..num_decode`.
    pub decode_rows: CUdeviceptr,
    pub num_decode: usize,
}

/// Grows a page-locked `slot` to at least `len` elements (to the next power of two).
pub(crate) fn grow_pinned(dev: &GpuDevice, slot: &mut Option<PinnedHostSlice<u32>>, len: usize) -> Result<(), CudaError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        // SAFETY: plain page-locked memory; every word is written before it is uploaded.
        *slot = Some(unsafe { dev.context.alloc_pinned_with_flags::<u32>(len.max(1).next_power_of_two(), 0)? });
    }
    Ok(())
}

/// Page-locked staging for one kind of per-forward upload (the batch's arrays, the fed tokens),
/// two buffers used by alternate forwards. A copy from pageable memory may make the driver wait
/// for the stream, which would stall the host behind the step in flight and undo async
/// scheduling; from page-locked memory it is enqueued and returns.
#[derive(Default)]
pub(crate) struct PinnedStaging {
    buffers: [Option<PinnedHostSlice<u32>>; 2],
}

impl PinnedStaging {
    /// Copies `words` into buffer `parity` and enqueues their upload to `dst` on the stream.
    /// The caller alternates `parity` between forwards and has collected the forward that used
    /// this buffer before (two forwards ago), so its copy is done.
    pub(crate) fn upload(&mut self, dev: &GpuDevice, parity: usize, words: &[u32], dst: CUdeviceptr) -> Result<(), CudaError> {
        let slot = &mut self.buffers[parity & 1];
        grow_pinned(dev, slot, words.len())?;
        let staging = &mut slot.as_mut().unwrap().as_mut_slice()?[..words.len()];
        staging.copy_from_slice(words);
        // SAFETY: `dst` holds `words.len()` words (the caller sized it); the staging buffer is not
        // written again before this copy has run (see above).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, staging, dev.stream.cu_stream())? };
        Ok(())
    }
}

/// Packs every index array of `batch` (and the attention plan's tiles and decode rows) into one
/// buffer of `scratch` with one upload (through `staging`, buffer `parity`), and returns where
/// each lies.
pub(crate) fn upload_batch(
    dev: &GpuDevice,
    scratch: &mut Scratch,
    batch: &ForwardBatch,
    plan: &AttentionPlan,
    staging: &mut PinnedStaging,
    parity: usize,
) -> Result<BatchArrays, CudaError> {
    let (tables, max_blocks) = pack_block_tables(batch);
    let n = batch.num_tokens();
    let decode_rows = plan.decode_rows.as_deref().unwrap_or(&[]);
    let mut packed: Vec<u32> =
        Vec::with_capacity(4 * n + tables.len() + batch.logits_rows.len() + 3 * plan.tiles.len() + decode_rows.len() + 1);
    packed.extend_from_slice(&batch.token_ids);
    packed.extend_from_slice(&batch.positions);
    packed.extend_from_slice(&batch.slot_mapping);
    packed.extend_from_slice(&batch.token_seq);
    packed.extend_from_slice(&tables);
    packed.extend(batch.logits_rows.iter().map(|&r| r as u32));
    let tiles_at = packed.len();
    packed.extend(plan.tile_words());
    let decode_rows_at = packed.len();
    packed.extend_from_slice(decode_rows);
    packed.push(0);
    let s = scratch;
    if packed.len() > s.capacity_indices {
        let capacity = packed.len().next_power_of_two();
        s.indices = Some(dev.stream.alloc_zeros(capacity)?);
        s.capacity_indices = capacity;
    }
    let indices = s.indices.as_mut().unwrap();
    let base = ptr(dev, indices);
    staging.upload(dev, parity, &packed, base)?;
    let at = |offset: usize| base + (offset * 4) as u64;
    Ok(BatchArrays {
        tokens: at(0),
        positions: at(n),
        slots: at(2 * n),
        token_seq: at(3 * n),
        block_tables: at(4 * n),
        rows: at(4 * n + tables.len()),
        max_blocks,
        tiles: at(tiles_at),
        num_tiles: plan.tiles.len(),
        decode_rows: if plan.decode_rows.is_some() { at(decode_rows_at) } else { 0 },
        num_decode: plan.num_decode(n),
    })
}
