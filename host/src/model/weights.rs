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

use super::gguf::GgmlType;
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

/// The types a backend keeps weights as.
pub trait Weights {
    /// An `[out, in]` matrix with an optional `[out]` bias.
    type Matrix: Send + Sync;
    /// A norm weight.
    type Vector: Send + Sync;
}

/// One source tensor of a weight: a `[rows, cols]` matrix stacked with others into one (Q, K and
/// V into QKV), or a norm's `[rows]` vector (`cols` 1). Stores read it in whichever form suits
/// them; both check the shape.
pub struct Part<'a> {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    source: &'a dyn WeightSource,
}

impl Part<'_> {
    fn shape(&self) -> Vec<usize> {
        if self.cols == 1 { vec![self.rows] } else { vec![self.rows, self.cols] }
    }

    fn shape_error(&self, got: &[usize]) -> ModelError {
        ModelError::Shape(format!("`{}` has shape {got:?}, the config needs {:?}", self.name, self.shape()))
    }

    /// The values as float32.
    pub fn f32(&self) -> Result<Vec<f32>, ModelError> {
        let shape = self.shape();
        match self.source.load(&self.name, &shape)? {
            Some(t) if t.shape == shape => Ok(t.data),
            Some(t) => Err(self.shape_error(&t.shape)),
            None => Err(ModelError::MissingTensor(self.name.clone())),
        }
    }

    /// The stored bytes, when the source lends them (see `WeightSource::raw`).
    pub fn raw(&self) -> Result<Option<RawTensor<'_>>, ModelError> {
        match self.source.raw(&self.name)? {
            Some(raw) if raw.shape == self.shape() => Ok(Some(raw)),
            Some(raw) => Err(self.shape_error(&raw.shape)),
            None => Ok(None),
        }
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

    /// An `[rows, cols]` matrix stacked from `parts` (their rows add up to `rows`), with their
    /// biases stacked likewise when given; `name` is for errors and progress.
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

/// Names the tensors of each weight, in Hugging Face's names, and hands them to a store.
pub struct Loader<'a, S: WeightStore> {
    source: &'a dyn WeightSource,
    pub store: &'a mut S,
    progress: Option<LoadProgress>,
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
        Loader { source, store, progress: None }
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
        Part { name: name.to_string(), rows, cols, source: self.source }
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

    /// One matrix stacked from `parts` (`(name, rows)`, each `[rows, cols]`), with the parts'
    /// biases (`{name without .weight}.bias`) stacked likewise when `bias` is set.
    pub fn stacked(&mut self, parts: &[(String, usize)], cols: usize, bias: bool) -> Result<<S::Family as Weights>::Matrix, ModelError> {
        let rows: usize = parts.iter().map(|(_, r)| r).sum();
        let weights: Vec<Part<'a>> = parts.iter().map(|(name, r)| self.part(name, *r, cols)).collect();
        let biases: Option<Vec<Part<'a>>> = bias.then(|| {
            parts
                .iter()
                .map(|(name, r)| self.part(&format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name)), *r, 1))
                .collect()
        });
        let label = parts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" + ");
        let matrix = self.store.matrix(&label, rows, cols, &weights, biases.as_deref())?;
        self.loaded(&label, (rows * cols) as u64 * S::BYTES_PER_ELEMENT);
        Ok(matrix)
    }

    /// One `[rows, cols]` matrix.
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<<S::Family as Weights>::Matrix, ModelError> {
        self.stacked(&[(name.to_string(), rows)], cols, false)
    }
}

/// Each part's float32 values, concatenated (what a host store keeps).
pub fn concat_f32(parts: &[Part<'_>]) -> Result<Vec<f32>, ModelError> {
    let mut data = Vec::with_capacity(parts.iter().map(|p| p.rows * p.cols).sum());
    for part in parts {
        data.extend(part.f32()?);
    }
    Ok(data)
}
