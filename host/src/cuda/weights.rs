//! How the CUDA backend keeps weights, and loading them straight to the device: matrices in
//! bfloat16 (their biases and every norm weight in float32), each tensor copied from the source to
//! its place in the device matrix as it is read.
//!
//! Host memory: tensors a source lends raw (memory-mapped safetensors) in bfloat16 are copied
//! straight from the map; float16 or float32 ones go through a staging buffer of `CONVERT_CHUNK`
//! values; GGUF blocks are copied as stored and dequantized on the device (`kernels/ggml.cu`);
//! anything else costs one tensor's float32 copy at a time. Dummy weights are drawn on the device
//! and never touch the host.
//!
//! A tensor-parallel shard (`model::parallel`) copies only its rank's rows and columns of each
//! tensor (`RawTensor::select`, borrowed from the map when they are one run, as a whole tensor
//! is). GGUF columns that split blocks cannot be cut as stored: that part goes through float32.
//!
//! GGUF kept quantized (`GpuStore::keeping_quantized`, `--keep-quantized`): layer projections and
//! untied heads stored in Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K stay in their blocks on the device
//! (`MatrixData::Ggml`), which the products read directly (see `cuda::gemv` and `gemm::ggml_linear`).
//!
//! FP8: `GpuMatrix::quantize_fp8` turns a loaded bf16 matrix into E4M3 with a scale per row on the
//! device (`kernels/fp8.cu`, the format of `model::fp8`), freeing the bf16 copy; `--quantization
//! fp8` does it to every dense projection as the model loads (`GpuModel::quantize_fp8`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::{bf16, f16};

use super::gemv::GemvWeight;
use super::launch::{dequant_config, row_threads, WeightFormat};
use super::launchers;
use super::model::ptr;
use super::{CudaError, GpuDevice};
use crate::model::gguf::GgmlType;
use crate::model::weights::{concat_f32, Part, RawDtype, WeightStore, Weights};
use crate::model::ModelError;

/// The CUDA backend's weight types.
pub struct GpuWeights;

impl Weights for GpuWeights {
    type Matrix = GpuMatrix;
    type Vector = CudaSlice<f32>;
}

/// A row-major `[rows, cols]` matrix with an optional float32 `[rows]` bias.
pub struct GpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
    pub bias: Option<CudaSlice<f32>>,
}

/// How a `GpuMatrix` holds its values.
pub enum MatrixData {
    Bf16(CudaSlice<bf16>),
    /// E4M3 bit patterns, row-major, and a float32 scale per row (`model::fp8::Fp8Matrix`).
    Fp8 { values: CudaSlice<u8>, scales: CudaSlice<f32> },
    /// GGUF blocks of a kept type (`WeightFormat::KEPT_GGML`) as stored, row after row (rows in
    /// Hugging Face's order).
    Ggml { ty: GgmlType, blocks: CudaSlice<u8> },
}

/// Elements converted on the host per upload when a tensor is not stored as bfloat16.
const CONVERT_CHUNK: usize = 1 << 22;

/// Builds `GpuWeights` on one device.
pub struct GpuStore {
    dev: Arc<GpuDevice>,
    bytes: usize,
    /// Added to every vector (norm weight) as it is loaded: Gemma's `(1 + w)` norms become plain
    /// ones, so no kernel needs to know.
    vector_offset: f32,
    /// Stored GGUF blocks on their way to `dequant_ggml`, grown to the largest tensor.
    staging: Option<CudaSlice<u8>>,
    /// Keep GGUF projections and heads of the kept types as stored (`MatrixData::Ggml`) instead
    /// of dequantizing them; with dummy weights, draw blocks of this type for them.
    keep_quantized: Option<GgmlType>,
}

impl GpuStore {
    pub fn new(dev: Arc<GpuDevice>) -> Self {
        GpuStore { dev, bytes: 0, vector_offset: 0.0, staging: None, keep_quantized: None }
    }

    /// Keeps GGUF layer projections and output heads of the kept types quantized on the device
    /// (see `kept_type`); dummy weights of those matrices become random blocks of `dummy_type`
    /// (`None`: dequantize everything to bf16, the default).
    pub fn keeping_quantized(mut self, dummy_type: Option<GgmlType>) -> Self {
        self.keep_quantized = dummy_type;
        self
    }

    /// The type the matrix made of `parts` stays in, if it stays quantized: every part is a dense
    /// layer projection or the untied head (the embedding feeds a gather, and experts and routers
    /// the MoE kernels, which read bf16), all stored in one kept type (or all dummies, drawn in
    /// the dummy type), in whole blocks (a shard's columns too).
    fn kept_type(&self, cols: usize, parts: &[Part<'_>]) -> Result<Option<GgmlType>, ModelError> {
        const PROJECTIONS: [&str; 10] = [
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.weight",
            "o_proj.weight",
            "gate_proj.weight",
            "up_proj.weight",
            "down_proj.weight",
            "qkv_proj.weight",
            "gate_up_proj.weight",
            "lm_head.weight",
        ];
        let Some(dummy_type) = self.keep_quantized else { return Ok(None) };
        let mut kept = None;
        for part in parts {
            if part.name.contains("experts") || !PROJECTIONS.iter().any(|suffix| part.name.ends_with(suffix)) {
                return Ok(None);
            }
            let ty = if part.is_dummy() {
                dummy_type
            } else {
                match part.raw()?.map(|raw| raw.dtype) {
                    Some(RawDtype::Ggml(ty)) => ty,
                    _ => return Ok(None),
                }
            };
            let whole_blocks = cols.is_multiple_of(ty.block_size()) && !RawDtype::Ggml(ty).splits_blocks(&part.selection.cols);
            if WeightFormat::kept(ty).is_none() || kept.is_some_and(|k| k != ty) || !whole_blocks {
                return Ok(None);
            }
            kept = Some(ty);
        }
        Ok(kept)
    }

    /// The `ty` blocks of the selected rows and `cols` columns of `parts`, one after another,
    /// each part's Q/K rows put back in Hugging Face's order (whole rows of blocks move), or
    /// random blocks for dummy parts.
    fn kept_blocks(&self, name: &str, ty: GgmlType, cols: usize, parts: &[Part<'_>]) -> Result<Vec<u8>, ModelError> {
        let row_bytes = cols / ty.block_size() * ty.type_size();
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.selection.num_rows()).sum::<usize>() * row_bytes);
        for part in parts {
            let (rows, part_cols) = part.selected_shape();
            if part.is_dummy() {
                out.extend(crate::model::sources::dummy_ggml_blocks(ty, rows, cols, name_seed(&part.name))?);
                continue;
            }
            let raw = part.raw()?.ok_or_else(|| ModelError::Format(format!("`{name}`: no stored blocks")))?;
            let bytes = part.select_raw(&raw)?;
            if part_cols != cols || bytes.len() != rows * row_bytes {
                return Err(ModelError::Shape(format!("`{}`: {} bytes of {ty:?} for [{rows}, {cols}]", part.name, bytes.len())));
            }
            match raw.interleaved_qk_head_dim {
                None => out.extend_from_slice(&bytes),
                // Rows of blocks move as the CPU path moves rows of values; a shard holds whole
                // heads (`RawTensor::select`), so its rows are put back head by head alike.
                Some(head_dim) => out.extend(crate::model::arch::llama::unpermute_qk_rows(&bytes, rows / head_dim, row_bytes)),
            }
        }
        Ok(out)
    }

    /// Folds the `(1 + w)` of `ModelConfig::norm_unit_offset` into the norm weights.
    pub fn with_unit_offset(mut self, unit_offset: bool) -> Self {
        self.vector_offset = if unit_offset { 1.0 } else { 0.0 };
        self
    }

    /// Bytes of matrices on the device so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn err(e: impl std::fmt::Display) -> ModelError {
        ModelError::Input(format!("CUDA upload: {e}"))
    }

    /// Copies `values` to `dst` from element `at` on.
    fn copy_bf16(&self, dst: &mut CudaSlice<bf16>, at: usize, values: &[bf16]) -> Result<(), ModelError> {
        let mut view = dst.slice_mut(at..at + values.len());
        self.dev.stream.memcpy_htod(values, &mut view).map_err(Self::err)
    }

    /// One part's selected values into `dst` from element `at`: raw ones chunk by chunk, the
    /// rest through float32.
    fn fill_part(&mut self, dst: &mut CudaSlice<bf16>, at: usize, part: &Part<'_>) -> Result<(), ModelError> {
        // A shard's columns that split GGUF blocks cannot be cut as stored: the source then
        // dequantizes the whole tensor on the host, and the shard keeps its slice.
        let Some(raw) = part.raw()?.filter(|raw| !raw.dtype.splits_blocks(&part.selection.cols)) else {
            return self.fill_f32(dst, at, part);
        };
        let bytes = part.select_raw(&raw)?;
        match raw.dtype {
            RawDtype::Ggml(ty) => self.dequantize(dst, at, ty, &bytes, raw.interleaved_qk_head_dim, part),
            _ if raw.interleaved_qk_head_dim.is_some() => Err(ModelError::Format(format!("`{}`: interleaved rows outside GGUF", part.name))),
            RawDtype::BF16 if cfg!(target_endian = "little") && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<bf16>()) => {
                // Stored as the device keeps it: straight from the map (or the shard's copy of
                // its slice), no host conversion at all.
                // SAFETY: `bf16` is a transparent `u16`; the bytes are 2-aligned (checked above),
                // `len / 2` values long, and borrowed for the call only.
                let values = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<bf16>(), bytes.len() / 2) };
                self.copy_bf16(dst, at, values)
            }
            _ => {
                // In chunks, so the host never holds more than one chunk beyond the map (and a
                // shard's copy of its slice).
                let width = if raw.dtype == RawDtype::F32 { 4 } else { 2 };
                for (chunk_index, chunk) in bytes.chunks(CONVERT_CHUNK * width).enumerate() {
                    let values: Vec<bf16> = match raw.dtype {
                        RawDtype::BF16 => chunk.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect(),
                        RawDtype::F16 => chunk.chunks_exact(2).map(|b| bf16::from_f32(f16::from_le_bytes([b[0], b[1]]).to_f32())).collect(),
                        RawDtype::F32 => chunk.chunks_exact(4).map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect(),
                        RawDtype::Ggml(_) => unreachable!("taken above"),
                    };
                    self.copy_bf16(dst, at + chunk_index * CONVERT_CHUNK, &values)?;
                }
                Ok(())
            }
        }
    }

    /// One part's selected values into `dst` from element `at` through float32 on the host.
    fn fill_f32(&mut self, dst: &mut CudaSlice<bf16>, at: usize, part: &Part<'_>) -> Result<(), ModelError> {
        let n = part.selected_len();
        let values: Vec<bf16> = part.f32()?.into_iter().map(bf16::from_f32).collect();
        if values.len() != n {
            return Err(ModelError::Shape(format!("`{}`: {} values for {n}", part.name, values.len())));
        }
        self.copy_bf16(dst, at, &values)
    }

    /// A part's selected GGUF blocks (`bytes`) copied to the device as they are and expanded
    /// there into `dst` from element `at` (`kernels/dequant.cu`), Q/K rows in heads of
    /// `qk_head_dim` put back in Hugging Face's order on the way (a shard holds whole heads).
    fn dequantize(&mut self, dst: &mut CudaSlice<bf16>, at: usize, ty: GgmlType, bytes: &[u8], qk_head_dim: Option<usize>, part: &Part<'_>) -> Result<(), ModelError> {
        let (rows, cols) = part.selected_shape();
        let expected = rows * cols / ty.block_size() * ty.type_size();
        if bytes.len() != expected || !cols.is_multiple_of(ty.block_size()) {
            return Err(ModelError::Shape(format!("`{}`: {} bytes of {ty:?} for [{rows}, {cols}]", part.name, bytes.len())));
        }
        if self.staging.as_ref().is_none_or(|s| s.len() < expected) {
            self.staging = Some(self.dev.stream.alloc_zeros::<u8>(expected).map_err(Self::err)?);
        }
        let staging = self.staging.as_mut().expect("sized above");
        self.dev.stream.memcpy_htod(bytes, &mut staging.slice_mut(..expected)).map_err(Self::err)?;
        let config = dequant_config(rows, cols);
        let out = ptr(&self.dev, dst) + (at * 2) as u64;
        let qk = qk_head_dim.unwrap_or(0) as i32;
        // SAFETY: `staging` holds the tensor's `rows * cols` values as `ty` blocks; `dst` holds
        // `rows * cols` values from `at` (checked by the caller's part sizes).
        unsafe {
            launchers::dequant_ggml(&self.dev, config, out, ptr(&self.dev, staging), ty as i32, rows as i32, cols as i32, qk)
                .map_err(Self::err)?;
        }
        Ok(())
    }

    /// `n` values uniform with standard deviation 0.02, drawn on the device from a seed made of
    /// the tensor's name (the same for every load).
    fn random(&self, name: &str, n: usize) -> Result<CudaSlice<bf16>, ModelError> {
        let seed = name_seed(name);
        let out = self.dev.stream.alloc_zeros::<bf16>(n).map_err(Self::err)?;
        let scale = 0.02f32 * 3f32.sqrt();
        let n64 = n as u64;
        let cfg = LaunchConfig { grid_dim: (1024, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `init_uniform_bf16` writes `n` values of `out`, a live allocation of `n`.
        unsafe { launchers::init_uniform_bf16(&self.dev, cfg, ptr(&self.dev, &out), n64, seed, scale).map_err(Self::err)? };
        Ok(out)
    }
}

impl GpuStore {
    /// A matrix's float32 bias on the device from its parts' selected rows: zeros for dummy
    /// weights.
    fn bias(&self, parts: Option<&[Part<'_>]>, dummy: bool, rows: usize) -> Result<Option<CudaSlice<f32>>, ModelError> {
        Ok(match parts {
            Some(_) if dummy => Some(self.dev.stream.alloc_zeros::<f32>(rows).map_err(Self::err)?),
            Some(parts) => Some(self.dev.stream.clone_htod(&concat_f32(parts)?).map_err(Self::err)?),
            None => None,
        })
    }
}

/// A seed made of a tensor's name (FNV-1a), the same for every load.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl WeightStore for GpuStore {
    type Family = GpuWeights;
    const BYTES_PER_ELEMENT: u64 = 2;

    fn matrix(&mut self, name: &str, rows: usize, cols: usize, parts: &[Part<'_>], bias: Option<&[Part<'_>]>) -> Result<GpuMatrix, ModelError> {
        let dummy = parts.first().is_some_and(Part::is_dummy);
        if let Some(ty) = self.kept_type(cols, parts)? {
            let blocks = self.kept_blocks(name, ty, cols, parts)?;
            if blocks.len() != rows * cols / ty.block_size() * ty.type_size() {
                return Err(ModelError::Shape(format!("`{name}`: {} bytes of {ty:?} for [{rows}, {cols}]", blocks.len())));
            }
            let bias = self.bias(bias, dummy, rows)?;
            self.bytes += blocks.len();
            let blocks = self.dev.stream.clone_htod(&blocks).map_err(Self::err)?;
            return Ok(GpuMatrix { rows, cols, data: MatrixData::Ggml { ty, blocks }, bias });
        }
        let data = if dummy {
            self.random(name, rows * cols)?
        } else {
            let mut data = self.dev.stream.alloc_zeros::<bf16>(rows * cols).map_err(Self::err)?;
            let mut at = 0;
            for part in parts {
                self.fill_part(&mut data, at, part)?;
                at += part.selected_len();
            }
            if at != rows * cols {
                return Err(ModelError::Shape(format!("`{name}`: parts of {at} values for [{rows}, {cols}]")));
            }
            data
        };
        let bias = self.bias(bias, dummy, rows)?;
        self.bytes += rows * cols * 2;
        Ok(GpuMatrix { rows, cols, data: MatrixData::Bf16(data), bias })
    }

    fn vector(&mut self, part: &Part<'_>) -> Result<CudaSlice<f32>, ModelError> {
        let values: Vec<f32> = part.f32()?.into_iter().map(|w| w + self.vector_offset).collect();
        self.dev.stream.clone_htod(&values).map_err(Self::err)
    }
}

impl GpuMatrix {
    pub fn format(&self) -> WeightFormat {
        match self.data {
            MatrixData::Bf16(_) => WeightFormat::Bf16,
            MatrixData::Fp8 { .. } => WeightFormat::Fp8,
            MatrixData::Ggml { ty, .. } => WeightFormat::Ggml(ty),
        }
    }

    /// The device address of a bf16 matrix, for the kernels that read only bf16 (the embedding
    /// gather, the MoE GEMM); an error for any other format.
    pub fn bf16_ptr(&self, dev: &GpuDevice) -> Result<cudarc::driver::sys::CUdeviceptr, CudaError> {
        match &self.data {
            MatrixData::Bf16(data) => Ok(ptr(dev, data)),
            _ => Err(CudaError::Config(format!("a {}x{} {:?} matrix where only bf16 is read", self.rows, self.cols, self.format()))),
        }
    }

    /// The weight as the products read it.
    pub fn weight(&self, dev: &GpuDevice) -> GemvWeight {
        match &self.data {
            MatrixData::Bf16(data) => GemvWeight::Bf16(ptr(dev, data)),
            MatrixData::Fp8 { values, scales } => GemvWeight::Fp8 { values: ptr(dev, values), scales: ptr(dev, scales) },
            MatrixData::Ggml { ty, blocks } => GemvWeight::Ggml { ty: *ty, blocks: ptr(dev, blocks) },
        }
    }

    /// The device address and length in bytes of the values a product streams (FP8's scales
    /// aside): what `AttentionArgs::l2_prefetch` pulls into L2.
    pub fn values_region(&self, dev: &GpuDevice) -> (cudarc::driver::sys::CUdeviceptr, usize) {
        match &self.data {
            MatrixData::Bf16(data) => (ptr(dev, data), data.len() * 2),
            MatrixData::Fp8 { values, .. } => (ptr(dev, values), values.len()),
            MatrixData::Ggml { blocks, .. } => (ptr(dev, blocks), blocks.len()),
        }
    }

    /// Bytes of its values (and scales) on the device, bias aside.
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatrixData::Bf16(data) => data.len() * 2,
            MatrixData::Fp8 { values, scales } => values.len() + scales.len() * 4,
            MatrixData::Ggml { blocks, .. } => blocks.len(),
        }
    }

    /// Quantizes a bf16 matrix to FP8 in place on the device (`kernels/fp8.cu`: a scale per row,
    /// as `model::fp8::Fp8Matrix::quantize`), freeing its bf16 values; an FP8 matrix stays as it
    /// is. Needs sm_89 or newer (the E4M3 conversions) and an even number of columns.
    pub fn quantize_fp8(&mut self, dev: &GpuDevice) -> Result<(), CudaError> {
        let MatrixData::Bf16(data) = &self.data else { return Ok(()); };
        if !self.cols.is_multiple_of(2) {
            return Err(CudaError::Config(format!("FP8 rows are quantized in pairs; {} columns", self.cols)));
        }
        let values = dev.stream.alloc_zeros::<u8>(self.rows * self.cols)?;
        let scales = dev.stream.alloc_zeros::<f32>(self.rows)?;
        let config = LaunchConfig { grid_dim: (self.rows as u32, 1, 1), block_dim: (row_threads(self.cols / 2), 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `data` holds rows x cols bf16 values, `values` as many bytes, `scales` a float
        // per row; one block per row.
        unsafe {
            launchers::fp8_quantize_rows(dev, config, ptr(dev, &values), ptr(dev, &scales), ptr(dev, data), self.cols as i32)?
        };
        // The bf16 copy is freed only after the kernel has read it (the free is stream-ordered).
        self.data = MatrixData::Fp8 { values, scales };
        Ok(())
    }
}
