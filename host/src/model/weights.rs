//! A model's weights, generic over the backend that holds them, and the one place that reads them
//! from a source (`Loader`).
//!
//! Layout: matrices are row-major `[out_features, in_features]` (Hugging Face's layout). The Q, K
//! and V projections are stacked into one `[q + 2 kv, hidden]` matrix and the gate and up
//! projections into one `[2 * intermediate, hidden]` matrix, so each needs a single product; a
//! mixture of experts stacks every expert's matrix the same way (`[experts * rows, in]`). Q and K
//! rows are in Hugging Face's order (rotate-half RoPE); sources that store them otherwise (GGUF
//! `llama`) un-permute them before they get here.
//!
//! Sources hand over one tensor at a time and the store keeps it in its own form (the CPU as
//! float32, a device as its own copy), so loading never holds more than the store's copy plus the
//! tensor in flight.
//!
//! Under tensor parallelism (`model::parallel`) a `Loader` loads one rank's shard: each `Part`
//! carries the rows and columns of its tensor the rank keeps (`Selection`), and the store keeps
//! only those.

use std::borrow::Cow;
use std::ops::Range;

use super::gguf::GgmlType;
use super::parallel::{ShardPlan, TensorParallel};
use super::ModelError;

/// A dense float32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ModelError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(ModelError::Shape(format!(
                "tensor of shape {shape:?} needs {expected} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Where weights come from. Names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`);
/// a source maps them to its own naming and returns the tensor in Hugging Face's layout.
pub trait WeightSource: Sync {
    /// The tensor with this Hugging Face name, with its shape, or `Ok(None)` if the source lacks it.
    fn load(&self, hf_name: &str, expected_shape: &[usize]) -> Result<Option<Tensor>, ModelError>;

    /// The tensor's stored bytes (a memory-mapped safetensors or GGUF file), with what it takes
    /// to put them in Hugging Face's layout: a device store copies these and converts them on the
    /// device, without a float32 copy on the host. `None` sends the store to `load`.
    fn raw(&self, _hf_name: &str) -> Result<Option<RawTensor<'_>>, ModelError> {
        Ok(None)
    }

    /// Whether the values are made up (`--load-format dummy`): a device store may make its own
    /// on the device instead of asking for them.
    fn is_dummy(&self) -> bool {
        false
    }
}

/// Stored tensor bytes (little-endian), as `WeightSource::raw` lends them.
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    pub dtype: RawDtype,
    /// Hugging Face's shape, outermost first.
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
    /// The rows of each head of this many rows are in llama.cpp's interleaved Q/K order (see
    /// `arch::llama::unpermute_qk_rows`) and must be put back.
    pub interleaved_qk_head_dim: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDtype {
    F32,
    F16,
    BF16,
    /// ggml blocks of this type (GGUF), whole rows of them.
    Ggml(GgmlType),
}

impl RawDtype {
    /// The same storage as a ggml type (a float is ggml's one-value block), whose sizes and
    /// conversion to float32 `model::gguf` has.
    fn as_ggml(self) -> GgmlType {
        match self {
            RawDtype::F32 => GgmlType::F32,
            RawDtype::F16 => GgmlType::F16,
            RawDtype::BF16 => GgmlType::BF16,
            RawDtype::Ggml(ty) => ty,
        }
    }

    /// How the type stores a row: this many values in a unit of this many bytes (one value of a
    /// float, one block of ggml).
    fn storage_unit(self) -> (usize, usize) {
        let ty = self.as_ggml();
        (ty.block_size(), ty.type_size())
    }

    /// Whether the columns `cols` start or end inside a ggml block, whose bytes cannot be cut
    /// apart (never for floats).
    pub fn splits_blocks(self, cols: &Range<usize>) -> bool {
        let (values, _) = self.storage_unit();
        !cols.start.is_multiple_of(values) || !cols.end.is_multiple_of(values)
    }

    /// The bytes of a stored row that hold its values `cols` (which must not split blocks).
    fn byte_range(self, cols: &Range<usize>) -> Range<usize> {
        let (values, bytes) = self.storage_unit();
        cols.start / values * bytes..cols.end / values * bytes
    }
}

impl<'a> RawTensor<'a> {
    /// The tensor as `[rows, cols]` (a vector: `[len, 1]`).
    fn rows_cols(&self) -> Result<(usize, usize), ModelError> {
        match self.shape[..] {
            [rows] => Ok((rows, 1)),
            [rows, cols] => Ok((rows, cols)),
            _ => Err(ModelError::Shape(format!("stored bytes of shape {:?}: only matrices and vectors are sliced", self.shape))),
        }
    }

    /// The stored bytes of `selection`, values unconverted, row-major: its runs of rows one
    /// after another, each row cut to its columns. Borrowed when they are one run of the stored
    /// bytes (the whole tensor, or whole rows of one range), copied otherwise.
    ///
    /// Refused: a selection outside the tensor, columns that split ggml blocks, and rows in
    /// llama.cpp's interleaved Q/K order that split a head. That order is put back head by head
    /// after the selection (`arch::llama::unpermute_qk_rows`, `dequant_ggml`'s `qk_head_dim`),
    /// and a head's rows are the same set in either order, so whole heads select the right rows.
    pub fn select(&self, selection: &Selection) -> Result<Cow<'a, [u8]>, ModelError> {
        let (rows, cols) = self.rows_cols()?;
        let refuse = |what: String| ModelError::Shape(format!("stored {:?} tensor {:?}: {what}", self.dtype, self.shape));
        if self.dtype.splits_blocks(&(0..cols)) {
            return Err(refuse("rows are not whole blocks".into()));
        }
        let row_bytes = self.dtype.byte_range(&(0..cols)).len();
        if self.bytes.len() != rows * row_bytes {
            return Err(refuse(format!("{} bytes, {} expected", self.bytes.len(), rows * row_bytes)));
        }
        if !selection.fits(rows, cols) {
            return Err(refuse(format!("the selection {selection:?} is empty or outside it")));
        }
        if self.dtype.splits_blocks(&selection.cols) {
            return Err(refuse(format!("the columns {:?} split blocks of {} values", selection.cols, self.dtype.storage_unit().0)));
        }
        if let Some(head_dim) = self.interleaved_qk_head_dim {
            if let Some(run) = selection.rows.iter().find(|r| !r.start.is_multiple_of(head_dim) || !r.end.is_multiple_of(head_dim)) {
                return Err(refuse(format!("the rows {run:?} split heads of {head_dim} interleaved Q/K rows")));
            }
        }
        let rows_bytes = |run: &Range<usize>| &self.bytes[run.start * row_bytes..run.end * row_bytes];
        let whole_rows = selection.cols == (0..cols);
        if let ([run], true) = (&selection.rows[..], whole_rows) {
            return Ok(Cow::Borrowed(rows_bytes(run)));
        }
        let cut = self.dtype.byte_range(&selection.cols);
        let mut out = Vec::with_capacity(selection.num_rows() * cut.len());
        for run in &selection.rows {
            if whole_rows {
                out.extend_from_slice(rows_bytes(run));
            } else {
                rows_bytes(run).chunks_exact(row_bytes).for_each(|row| out.extend_from_slice(&row[cut.clone()]));
            }
        }
        Ok(Cow::Owned(out))
    }

    /// The values of `selection` as float32 in Hugging Face's layout, converted from the selected
    /// stored bytes only: floats widened, ggml blocks dequantized, interleaved Q/K rows put back
    /// head by head. `None` when the columns split ggml blocks, which only the whole tensor's
    /// values can cut.
    pub fn selected_f32(&self, selection: &Selection) -> Result<Option<Vec<f32>>, ModelError> {
        if self.dtype.splits_blocks(&selection.cols) {
            return Ok(None);
        }
        let bytes = self.select(selection)?;
        let (rows, cols) = (selection.num_rows(), selection.cols.len());
        let mut values = vec![0.0; rows * cols];
        super::gguf::dequantize(self.dtype.as_ggml(), &bytes, rows * cols, &mut values)?;
        Ok(Some(match self.interleaved_qk_head_dim {
            // `select` refused rows that split a head, so these are whole heads.
            Some(head_dim) => super::arch::llama::unpermute_qk_rows(&values, rows / head_dim, cols),
            None => values,
        }))
    }
}

/// The types a backend keeps weights as.
pub trait Weights {
    /// An `[out, in]` matrix with an optional `[out]` bias.
    type Matrix: Send + Sync;
    /// A norm weight.
    type Vector: Send + Sync;
}

/// What a store keeps of a `[rows, cols]` source tensor: some runs of its rows, in order, and
/// one run of its columns. All of it, but for a tensor-parallel shard (`model::parallel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub rows: Vec<Range<usize>>,
    pub cols: Range<usize>,
}

impl Selection {
    pub fn whole(rows: usize, cols: usize) -> Self {
        Selection { rows: Self::all_rows(rows), cols: 0..cols }
    }

    /// Every row of `rows`, as one run.
    #[allow(clippy::single_range_in_vec_init)] // one run of rows is meant, not the rows one by one
    fn all_rows(rows: usize) -> Vec<Range<usize>> {
        vec![0..rows]
    }

    pub fn is_whole(&self, rows: usize, cols: usize) -> bool {
        *self == Selection::whole(rows, cols)
    }

    pub fn num_rows(&self) -> usize {
        self.rows.iter().map(Range::len).sum()
    }

    /// The selected values of the row-major `[_, cols]` tensor `values`.
    fn take(&self, values: &[f32], cols: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.num_rows() * self.cols.len());
        for row in self.rows.iter().flat_map(Clone::clone) {
            out.extend_from_slice(&values[row * cols..][self.cols.clone()]);
        }
        out
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        let fits = |r: &Range<usize>, len: usize| r.start < r.end && r.end <= len;
        self.rows.iter().all(|r| fits(r, rows)) && fits(&self.cols, cols)
    }
}

/// One source tensor of a weight: a `[rows, cols]` matrix stacked with others into one (Q, K and
/// V into QKV), or a norm's `[rows]` vector (`cols` 1), of which the store keeps `selection`.
/// Stores read it in whichever form suits them; both check the shape.
pub struct Part<'a> {
    pub name: String,
    /// The tensor's shape in the source.
    pub rows: usize,
    pub cols: usize,
    pub selection: Selection,
    source: &'a dyn WeightSource,
}

impl Part<'_> {
    fn shape(&self) -> Vec<usize> {
        if self.cols == 1 { vec![self.rows] } else { vec![self.rows, self.cols] }
    }

    fn shape_error(&self, got: &[usize]) -> ModelError {
        ModelError::Shape(format!("`{}` has shape {got:?}, the config needs {:?}", self.name, self.shape()))
    }

    /// Whether the store keeps the whole tensor (always, but for a tensor-parallel shard).
    pub fn is_whole(&self) -> bool {
        self.selection.is_whole(self.rows, self.cols)
    }

    /// The `[rows, cols]` the store keeps.
    pub fn selected_shape(&self) -> (usize, usize) {
        (self.selection.num_rows(), self.selection.cols.len())
    }

    /// Values the store keeps.
    pub fn selected_len(&self) -> usize {
        self.selection.num_rows() * self.selection.cols.len()
    }

    /// The selected values as float32: a slice from its stored bytes where the source lends them,
    /// else cut from the whole tensor.
    pub fn f32(&self) -> Result<Vec<f32>, ModelError> {
        // A shard converts only its slice of the stored bytes where the source lends them, not
        // the whole tensor once per rank.
        if !self.is_whole() {
            if let Some(values) = self.raw()?.map(|raw| raw.selected_f32(&self.selection)).transpose()?.flatten() {
                return Ok(values);
            }
        }
        self.f32_of_whole_tensor()
    }

    /// The selected values cut from the whole tensor's float32 values (`WeightSource::load`).
    pub(crate) fn f32_of_whole_tensor(&self) -> Result<Vec<f32>, ModelError> {
        let shape = self.shape();
        let values = match self.source.load(&self.name, &shape)? {
            Some(t) if t.shape == shape => t.data,
            Some(t) => return Err(self.shape_error(&t.shape)),
            None => return Err(ModelError::MissingTensor(self.name.clone())),
        };
        Ok(if self.is_whole() { values } else { self.selection.take(&values, self.cols) })
    }

    /// The stored bytes, when the source lends them (see `WeightSource::raw`).
    pub fn raw(&self) -> Result<Option<RawTensor<'_>>, ModelError> {
        match self.source.raw(&self.name)? {
            Some(raw) if raw.shape == self.shape() => Ok(Some(raw)),
            Some(raw) => Err(self.shape_error(&raw.shape)),
            None => Ok(None),
        }
    }

    /// The selected bytes of `raw`, this part's stored tensor (`RawTensor::select`), refusals
    /// naming the tensor.
    pub fn select_raw<'r>(&self, raw: &RawTensor<'r>) -> Result<Cow<'r, [u8]>, ModelError> {
        raw.select(&self.selection).map_err(|e| match e {
            ModelError::Shape(why) => ModelError::Shape(format!("`{}`: {why}", self.name)),
            other => other,
        })
    }

    /// Whether the source makes its values up (see `WeightSource::is_dummy`).
    pub fn is_dummy(&self) -> bool {
        self.source.is_dummy()
    }
}

/// Builds a backend's weights, one tensor at a time.
pub trait WeightStore {
    type Family: Weights;
    /// Bytes one matrix element takes in the store (for progress).
    const BYTES_PER_ELEMENT: u64;

    /// An `[rows, cols]` matrix stacked from `parts` (their selected rows add up to `rows`, each
    /// selects `cols` columns), with their biases stacked likewise when given; `name` is for
    /// errors and progress.
    fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        parts: &[Part<'_>],
        bias: Option<&[Part<'_>]>,
    ) -> Result<<Self::Family as Weights>::Matrix, ModelError>;

    fn vector(&mut self, part: &Part<'_>) -> Result<<Self::Family as Weights>::Vector, ModelError>;
}

/// Turns one weight into another form (see `ModelWeights::try_map`).
pub type MapFn<'a, From, To, E> = dyn Fn(&From) -> Result<To, E> + 'a;

pub struct ModelWeights<W: Weights> {
    /// `[vocab, hidden]`.
    pub embed_tokens: W::Matrix,
    pub layers: Vec<LayerWeights<W>>,
    pub final_norm: W::Vector,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<W::Matrix>,
    /// Which part of the model these are: all of it, or one tensor-parallel rank's shard (whose
    /// `embed_tokens` and `lm_head` rows are the token ids `shard.vocab`).
    pub shard: ShardPlan,
}

impl<W: Weights> ModelWeights<W> {
    /// The output projection (the embedding matrix when tied).
    pub fn lm_head(&self) -> &W::Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The same weights in another form: every matrix through `matrix`, every vector through
    /// `vector` (e.g. a host copy uploaded to a device, or rounded to bfloat16).
    pub fn try_map<V: Weights, E>(&self, matrix: &MapFn<'_, W::Matrix, V::Matrix, E>, vector: &MapFn<'_, W::Vector, V::Vector, E>) -> Result<ModelWeights<V>, E> {
        self.try_map_by_role(&|_, m| matrix(m), vector)
    }

    /// As `try_map`, telling `matrix` which role each matrix plays: weight-only quantization
    /// (FP8) converts the layers' projections and leaves the embeddings, the head and the routers
    /// as they are, as vLLM's does.
    pub fn try_map_by_role<V: Weights, E>(
        &self,
        matrix: &dyn Fn(MatrixRole, &W::Matrix) -> Result<V::Matrix, E>,
        vector: &MapFn<'_, W::Vector, V::Vector, E>,
    ) -> Result<ModelWeights<V>, E> {
        let opt = |v: &Option<W::Vector>| v.as_ref().map(vector).transpose();
        let projection = |m: &W::Matrix| matrix(MatrixRole::Projection, m);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    attn_norm: vector(&l.attn_norm)?,
                    qkv: projection(&l.qkv)?,
                    q_norm: opt(&l.q_norm)?,
                    k_norm: opt(&l.k_norm)?,
                    o_proj: projection(&l.o_proj)?,
                    post_attn_norm: opt(&l.post_attn_norm)?,
                    ffn_norm: vector(&l.ffn_norm)?,
                    post_ffn_norm: opt(&l.post_ffn_norm)?,
                    mlp: match &l.mlp {
                        Mlp::Dense { gate_up, down } => Mlp::Dense { gate_up: projection(gate_up)?, down: projection(down)? },
                        Mlp::Moe(e) => Mlp::Moe(MoeWeights {
                            router: matrix(MatrixRole::Router, &e.router)?,
                            gate_up: projection(&e.gate_up)?,
                            down: projection(&e.down)?,
                        }),
                    },
                })
            })
            .collect::<Result<Vec<_>, E>>()?;
        Ok(ModelWeights {
            embed_tokens: matrix(MatrixRole::Embedding, &self.embed_tokens)?,
            layers,
            final_norm: vector(&self.final_norm)?,
            lm_head: self.lm_head.as_ref().map(|m| matrix(MatrixRole::Head, m)).transpose()?,
            shard: self.shard.clone(),
        })
    }
}

/// What a matrix is in the model (see `ModelWeights::try_map_by_role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixRole {
    /// The token embedding (also the head when the two are tied).
    Embedding,
    /// An untied output head.
    Head,
    /// A layer's linear projection: qkv, o_proj, gate_up, down (an expert's too).
    Projection,
    /// A mixture's router.
    Router,
}

pub struct LayerWeights<W: Weights> {
    /// The norm before attention.
    pub attn_norm: W::Vector,
    /// `[q_size + 2 * kv_size, hidden]`: Q rows, then K rows, then V rows (bias likewise).
    pub qkv: W::Matrix,
    /// `[head_dim]` norms of every query and key head (Qwen3, Gemma 3).
    pub q_norm: Option<W::Vector>,
    pub k_norm: Option<W::Vector>,
    /// `[hidden, q_size]`.
    pub o_proj: W::Matrix,
    /// On the attention output before it joins the residual (Gemma's `post_attention_layernorm`).
    pub post_attn_norm: Option<W::Vector>,
    /// The norm before the MLP.
    pub ffn_norm: W::Vector,
    /// On the MLP output before it joins the residual (Gemma's `post_feedforward_layernorm`).
    pub post_ffn_norm: Option<W::Vector>,
    pub mlp: Mlp<W>,
}

pub enum Mlp<W: Weights> {
    Dense {
        /// `[2 * intermediate, hidden]`: gate rows, then up rows.
        gate_up: W::Matrix,
        /// `[hidden, intermediate]`.
        down: W::Matrix,
    },
    Moe(MoeWeights<W>),
}

pub struct MoeWeights<W: Weights> {
    /// `[experts, hidden]`.
    pub router: W::Matrix,
    /// `[experts * 2 * expert_intermediate, hidden]`: each expert's gate rows then up rows.
    pub gate_up: W::Matrix,
    /// `[experts * hidden, expert_intermediate]`.
    pub down: W::Matrix,
}

/// One source tensor of a stacked matrix, in Hugging Face's name: its rows in the checkpoint and
/// the runs of them the store keeps (all, but for a tensor-parallel shard).
pub struct StackedPart {
    pub name: String,
    pub rows: usize,
    pub keep: Vec<Range<usize>>,
}

impl StackedPart {
    pub fn whole(name: impl Into<String>, rows: usize) -> Self {
        StackedPart { name: name.into(), rows, keep: Selection::all_rows(rows) }
    }

    /// Only the rows `keep` of the tensor.
    pub fn rows(name: impl Into<String>, rows: usize, keep: Vec<Range<usize>>) -> Self {
        StackedPart { name: name.into(), rows, keep }
    }

    fn kept_rows(&self) -> usize {
        self.keep.iter().map(Range::len).sum()
    }
}

/// The bias beside a weight: `{name without .weight}.bias`.
fn bias_name(weight: &str) -> String {
    format!("{}.bias", weight.strip_suffix(".weight").unwrap_or(weight))
}

/// Names the tensors of each weight, in Hugging Face's names, and hands them to a store: the
/// whole of each, or one tensor-parallel rank's slices (`with_shard`).
pub struct Loader<'a, S: WeightStore> {
    source: &'a dyn WeightSource,
    pub store: &'a mut S,
    progress: Option<LoadProgress>,
    parallel: TensorParallel,
}

/// Loads at least this large show their progress.
const PROGRESS_MIN_BYTES: u64 = 1 << 30;

/// Progress of a large load: a bar on a terminal, else a log line every tenth.
struct LoadProgress {
    bar: indicatif::ProgressBar,
    total: u64,
    next_log: u64,
    started: std::time::Instant,
}

impl LoadProgress {
    fn new(total: u64) -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
        let style = indicatif::ProgressStyle::with_template("loading weights {bar:40} {binary_bytes}/{binary_total_bytes} {elapsed}")
            .expect("a valid template");
        bar.set_style(style);
        LoadProgress { bar, total, next_log: total / 10, started: std::time::Instant::now() }
    }

    fn advance(&mut self, bytes: u64, name: &str) {
        self.bar.inc(bytes);
        let done = self.bar.position();
        if self.bar.is_hidden() && done >= self.next_log {
            tracing::info!(
                percent = 100 * done / self.total.max(1),
                gib = format!("{:.1}", done as f64 / (1u64 << 30) as f64),
                seconds = format!("{:.1}", self.started.elapsed().as_secs_f64()),
                last = name,
                "loading weights"
            );
            while self.next_log <= done {
                self.next_log += (self.total / 10).max(1);
            }
        }
    }
}

impl Drop for LoadProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

impl<'a, S: WeightStore> Loader<'a, S> {
    pub fn new(source: &'a dyn WeightSource, store: &'a mut S) -> Self {
        Loader { source, store, progress: None, parallel: TensorParallel::SINGLE }
    }

    /// Loads rank `parallel.rank`'s shard (`model::parallel`) instead of the whole model.
    pub fn with_shard(mut self, parallel: TensorParallel) -> Self {
        self.parallel = parallel;
        self
    }

    /// Which rank's shard this loads (world 1: the whole model).
    pub fn tensor_parallel(&self) -> TensorParallel {
        self.parallel
    }

    /// Shows progress (a bar on a terminal, log lines otherwise) when the store will hold at
    /// least 1 GiB; `total_bytes` is what it will hold.
    pub fn with_progress(mut self, total_bytes: u64) -> Self {
        if total_bytes >= PROGRESS_MIN_BYTES {
            self.progress = Some(LoadProgress::new(total_bytes));
        }
        self
    }

    /// Counts `bytes` as loaded.
    fn loaded(&mut self, name: &str, bytes: u64) {
        if let Some(progress) = self.progress.as_mut() {
            progress.advance(bytes, name);
        }
    }

    fn part(&self, name: &str, rows: usize, cols: usize) -> Part<'a> {
        Part { name: name.to_string(), rows, cols, selection: Selection::whole(rows, cols), source: self.source }
    }

    /// `selection` of the `[rows, cols]` tensor `name`, refused when it reaches outside it (a bug
    /// of the shard plan, not of the checkpoint).
    fn selected_part(&self, name: &str, rows: usize, cols: usize, selection: Selection) -> Result<Part<'a>, ModelError> {
        if !selection.fits(rows, cols) {
            return Err(ModelError::Shape(format!("`{name}` [{rows}, {cols}]: the selection {selection:?} is empty or outside it")));
        }
        Ok(Part { name: name.to_string(), rows, cols, selection, source: self.source })
    }

    pub fn vector(&mut self, name: &str, len: usize) -> Result<<S::Family as Weights>::Vector, ModelError> {
        let part = self.part(name, len, 1);
        let vector = self.store.vector(&part)?;
        self.loaded(name, len as u64 * 4);
        Ok(vector)
    }

    pub fn optional_vector(&mut self, name: &str, len: usize, present: bool) -> Result<Option<<S::Family as Weights>::Vector>, ModelError> {
        if !present {
            return Ok(None);
        }
        self.vector(name, len).map(Some)
    }

    /// One matrix stacked from the kept rows of `parts` (each `[rows, cols]`), with the parts'
    /// biases (`{name without .weight}.bias`) stacked likewise when `bias` is set: whole, or
    /// split by output rows (column-parallel).
    pub fn stacked(&mut self, parts: &[StackedPart], cols: usize, bias: bool) -> Result<<S::Family as Weights>::Matrix, ModelError> {
        let weights = parts
            .iter()
            .map(|p| self.selected_part(&p.name, p.rows, cols, Selection { rows: p.keep.clone(), cols: 0..cols }))
            .collect::<Result<Vec<_>, _>>()?;
        let biases = bias
            .then(|| parts.iter().map(|p| self.selected_part(&bias_name(&p.name), p.rows, 1, Selection { rows: p.keep.clone(), cols: 0..1 })).collect())
            .transpose()?;
        let rows = parts.iter().map(StackedPart::kept_rows).sum();
        self.load_matrix(rows, cols, &weights, biases)
    }

    /// One matrix stacked from whole `parts` (`(name, rows)`, each `[rows, cols]`) of which only
    /// the columns `keep` are kept: split by input columns (row-parallel), every rank's product a
    /// partial sum. A bias (as in `stacked`) is then added by rank 0 alone, so the sum has it once.
    pub fn split_columns(&mut self, parts: &[(String, usize)], cols: usize, keep: Range<usize>, bias: bool) -> Result<<S::Family as Weights>::Matrix, ModelError> {
        let weights = parts
            .iter()
            .map(|(name, rows)| self.selected_part(name, *rows, cols, Selection { rows: Selection::all_rows(*rows), cols: keep.clone() }))
            .collect::<Result<Vec<_>, _>>()?;
        let biases = (bias && self.parallel.rank == 0).then(|| parts.iter().map(|(name, rows)| self.part(&bias_name(name), *rows, 1)).collect());
        let rows = parts.iter().map(|(_, rows)| rows).sum();
        self.load_matrix(rows, keep.len(), &weights, biases)
    }

    /// One whole `[rows, cols]` matrix (replicated on every rank).
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<<S::Family as Weights>::Matrix, ModelError> {
        self.stacked(&[StackedPart::whole(name, rows)], cols, false)
    }

    /// The store's `[rows, cols]` matrix of the selected `weights` (and `biases`).
    fn load_matrix(&mut self, rows: usize, cols: usize, weights: &[Part<'a>], biases: Option<Vec<Part<'a>>>) -> Result<<S::Family as Weights>::Matrix, ModelError> {
        let label = weights.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(" + ");
        let matrix = self.store.matrix(&label, rows, cols, weights, biases.as_deref())?;
        self.loaded(&label, (rows * cols) as u64 * S::BYTES_PER_ELEMENT);
        Ok(matrix)
    }
}

/// Each part's selected float32 values, concatenated (what a host store keeps).
pub fn concat_f32(parts: &[Part<'_>]) -> Result<Vec<f32>, ModelError> {
    let mut data = Vec::with_capacity(parts.iter().map(Part::selected_len).sum());
    for part in parts {
        data.extend(part.f32()?);
    }
    Ok(data)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // selections of one run of rows
mod tests {
    use super::*;
    use crate::model::cpu::CpuStore;

    /// `m.weight`, a `[4, 4]` matrix holding 0..16 row by row, and its bias `m.bias`, 100..104.
    struct Counting;

    impl WeightSource for Counting {
        fn load(&self, hf_name: &str, _: &[usize]) -> Result<Option<Tensor>, ModelError> {
            Ok(match hf_name {
                "m.weight" => Some(Tensor::new(vec![4, 4], (0..16).map(|v| v as f32).collect())?),
                "m.bias" => Some(Tensor::new(vec![4], (100..104).map(|v| v as f32).collect())?),
                _ => None,
            })
        }
    }

    #[test]
    fn a_shard_keeps_the_selected_rows_and_columns() {
        let mut store = CpuStore::default();
        let mut loader = Loader::new(&Counting, &mut store).with_shard(TensorParallel::new(1, 2).unwrap());
        let rows = loader.stacked(&[StackedPart::rows("m.weight", 4, vec![1..2, 3..4])], 4, true).unwrap();
        assert_eq!((rows.rows, rows.cols), (2, 4));
        assert_eq!(rows.data, [4.0, 5.0, 6.0, 7.0, 12.0, 13.0, 14.0, 15.0]);
        assert_eq!(rows.bias, Some(vec![101.0, 103.0]));
        let cols = loader.split_columns(&[("m.weight".to_string(), 4)], 4, 2..4, true).unwrap();
        assert_eq!((cols.rows, cols.cols), (4, 2));
        assert_eq!(cols.data, [2.0, 3.0, 6.0, 7.0, 10.0, 11.0, 14.0, 15.0]);
        // Row-parallel: the ranks' products are summed, so only rank 0 adds the bias.
        assert_eq!(cols.bias, None);
        let mut store = CpuStore::default();
        let mut rank0 = Loader::new(&Counting, &mut store).with_shard(TensorParallel::new(0, 2).unwrap());
        assert_eq!(rank0.split_columns(&[("m.weight".to_string(), 4)], 4, 0..2, true).unwrap().bias, Some(vec![100.0, 101.0, 102.0, 103.0]));
    }

    fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
        values.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    fn raw<'a>(dtype: RawDtype, shape: &[usize], bytes: &'a [u8]) -> RawTensor<'a> {
        RawTensor { dtype, shape: shape.to_vec(), bytes, interleaved_qk_head_dim: None }
    }

    /// A selection of the runs of rows `rows`.
    fn selection(rows: &[Range<usize>], cols: Range<usize>) -> Selection {
        Selection { rows: rows.to_vec(), cols }
    }

    /// The float32 values of `[_, cols]` little-endian float32 bytes.
    fn f32_values(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    /// `[4, 3]` float32 0..12 row by row: the selected bytes are the selected values, rows in the
    /// selection's order, each cut to its columns.
    #[test]
    fn selecting_dense_rows_and_columns_keeps_the_selected_values_in_order() {
        let bytes = f32_bytes((0..12).map(|v| v as f32));
        let tensor = raw(RawDtype::F32, &[4, 3], &bytes);
        type Case<'a> = (&'a [Range<usize>], Range<usize>, &'a [f32]);
        let cases: [Case<'_>; 4] = [
            (&[1..2, 3..4], 0..3, &[3.0, 4.0, 5.0, 9.0, 10.0, 11.0]),
            (&[0..4], 1..3, &[1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 11.0]),
            (&[2..4, 0..1], 2..3, &[8.0, 11.0, 2.0]),
            (&[3..4, 0..2], 0..3, &[9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        ];
        for (rows, cols, want) in cases {
            let picked = selection(rows, cols);
            let got = tensor.select(&picked).unwrap();
            assert_eq!(f32_values(&got), want, "{picked:?}");
            // The same values the float32 path keeps.
            assert_eq!(picked.take(&(0..12).map(|v| v as f32).collect::<Vec<_>>(), 3), want);
        }
    }

    #[test]
    fn one_run_of_whole_rows_is_borrowed_and_the_whole_tensor_is_the_stored_bytes() {
        let bytes: Vec<u8> = (0..24).collect();
        for dtype in [RawDtype::F16, RawDtype::BF16] {
            let tensor = raw(dtype, &[4, 3], &bytes);
            let whole = tensor.select(&Selection::whole(4, 3)).unwrap();
            assert!(matches!(whole, Cow::Borrowed(b) if std::ptr::eq(b, &bytes[..])));
            assert!(matches!(tensor.select(&selection(&[1..3], 0..3)).unwrap(), Cow::Borrowed(b) if b == &bytes[6..18]));
            // Two-byte values: row 1's columns 1..3 are its bytes 2..6.
            assert_eq!(&*tensor.select(&selection(&[1..2], 1..3)).unwrap(), &bytes[8..12]);
        }
        // A vector is `[len, 1]`.
        let bias = f32_bytes([1.0, 2.0, 3.0, 4.0]);
        assert_eq!(f32_values(&raw(RawDtype::F32, &[4], &bias).select(&selection(&[3..4, 0..2], 0..1)).unwrap()), [4.0, 1.0, 2.0]);
    }

    /// `rows` rows of random `ty` blocks for `cols` columns, and their float32 values.
    fn blocks(ty: GgmlType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        let bytes = crate::model::sources::dummy_ggml_blocks(ty, rows, cols, 7).unwrap();
        let mut values = vec![0.0; rows * cols];
        crate::model::gguf::dequantize(ty, &bytes, rows * cols, &mut values).unwrap();
        (bytes, values)
    }

    /// Whole blocks cut from GGUF rows dequantize to the same values as the float32 path's
    /// slice; a column range inside a block is refused.
    #[test]
    fn ggml_columns_are_cut_on_block_boundaries_only() {
        for (ty, blocks_per_row) in [(GgmlType::Q8_0, 4), (GgmlType::Q4_K, 3)] {
            let (rows, cols) = (5, blocks_per_row * ty.block_size());
            let (bytes, values) = blocks(ty, rows, cols);
            let tensor = raw(RawDtype::Ggml(ty), &[rows, cols], &bytes);
            let b = ty.block_size();
            for picked in [selection(&[0..5], b..3 * b), selection(&[3..5, 0..1], 0..b), selection(&[1..2, 4..5], 2 * b..cols), Selection::whole(rows, cols)] {
                let cut = tensor.select(&picked).unwrap();
                assert_eq!(cut.len(), picked.num_rows() * picked.cols.len() / b * ty.type_size(), "{ty:?} {picked:?}");
                let mut got = vec![0.0; picked.num_rows() * picked.cols.len()];
                crate::model::gguf::dequantize(ty, &cut, got.len(), &mut got).unwrap();
                assert_eq!(got, picked.take(&values, cols), "{ty:?} {picked:?}");
            }
            for cols in [1..b, b / 2..b, 0..b + 1, b..cols - 16] {
                assert!(RawDtype::Ggml(ty).splits_blocks(&cols));
                let err = tensor.select(&selection(&[0..1], cols.clone())).unwrap_err();
                assert!(matches!(&err, ModelError::Shape(m) if m.contains("split blocks")), "{ty:?} {cols:?}: {err}");
            }
        }
        assert!(!RawDtype::F32.splits_blocks(&(3..5)) && !RawDtype::Ggml(GgmlType::F16).splits_blocks(&(1..3)));
    }

    #[test]
    fn selections_outside_the_tensor_and_wrong_sizes_are_refused() {
        let bytes = f32_bytes((0..12).map(|v| v as f32));
        let tensor = raw(RawDtype::F32, &[4, 3], &bytes);
        for picked in [selection(&[3..5], 0..3), selection(&[1..1], 0..3), selection(&[0..1], 2..4), selection(&[0..1], 2..2)] {
            assert!(matches!(tensor.select(&picked), Err(ModelError::Shape(_))), "{picked:?}");
        }
        // The stored bytes must be the shape's.
        assert!(raw(RawDtype::F32, &[4, 4], &bytes).select(&Selection::whole(4, 4)).is_err());
        assert!(raw(RawDtype::F32, &[2, 2, 3], &bytes).select(&Selection::whole(2, 3)).is_err());
        // Rows of a block type hold whole blocks.
        assert!(raw(RawDtype::Ggml(GgmlType::Q8_0), &[1, 16], &bytes[..34]).select(&Selection::whole(1, 16)).is_err());
    }

    /// llama.cpp interleaves Q/K rows within each head, and the order is put back after the
    /// selection, head by head: whole heads give the rows the whole tensor put back would, a
    /// run that splits a head is refused.
    #[test]
    fn interleaved_qk_rows_are_selected_by_whole_heads() {
        use crate::model::arch::llama::unpermute_qk_rows;
        let (head_dim, heads, cols) = (4, 3, 2);
        let rows = head_dim * heads;
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let bytes = f32_bytes(values.iter().copied());
        let tensor = RawTensor { interleaved_qk_head_dim: Some(head_dim), ..raw(RawDtype::F32, &[rows, cols], &bytes) };
        let in_hf_order = unpermute_qk_rows(&values, heads, cols);
        for picked in [selection(&[4..8], 0..2), selection(&[0..4, 8..12], 1..2), selection(&[8..12], 0..2)] {
            let cut = f32_values(&tensor.select(&picked).unwrap());
            let got = unpermute_qk_rows(&cut, picked.num_rows() / head_dim, picked.cols.len());
            assert_eq!(got, picked.take(&in_hf_order, cols), "{picked:?}");
        }
        for picked in [selection(&[2..6], 0..2), selection(&[4..8, 8..10], 0..2)] {
            let err = tensor.select(&picked).unwrap_err();
            assert!(err.to_string().contains("split heads of 4"), "{picked:?}: {err}");
        }
    }

    #[test]
    fn a_selection_outside_the_tensor_is_refused() {
        let mut store = CpuStore::default();
        let mut loader = Loader::new(&Counting, &mut store);
        for keep in [vec![1..2, 3..5], vec![0..1, 2..2]] {
            let err = loader.stacked(&[StackedPart::rows("m.weight", 4, keep)], 4, false).unwrap_err();
            assert!(matches!(err, ModelError::Shape(_)), "{err}");
        }
        assert!(loader.split_columns(&[("m.weight".to_string(), 4)], 4, 3..5, false).is_err());
    }
}
