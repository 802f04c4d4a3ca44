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
pub trait WeightSource {
    /// The tensor with this Hugging Face name, with its shape, or `Ok(None)` if the source lacks it.
    fn load(&self, hf_name: &str, expected_shape: &[usize]) -> Result<Option<Tensor>, ModelError>;
}

/// The types a backend keeps weights as.
pub trait Weights {
    /// An `[out, in]` matrix with an optional `[out]` bias.
    type Matrix: Send + Sync;
    /// A norm weight.
    type Vector: Send + Sync;
}

/// Builds a backend's weights from float32 tensors, one at a time.
pub trait WeightStore {
    type Family: Weights;

    /// An `[rows, cols]` matrix (`data` row-major) with an optional `[rows]` bias; `name` is for
    /// errors and progress.
    fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<<Self::Family as Weights>::Matrix, ModelError>;

    fn vector(&mut self, name: &str, data: Vec<f32>) -> Result<<Self::Family as Weights>::Vector, ModelError>;
}

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

/// Reads tensors by Hugging Face name from a source, checks their shapes, stacks them, and hands
/// them to a store.
pub struct Loader<'a, S: WeightStore> {
    source: &'a dyn WeightSource,
    pub store: &'a mut S,
}

impl<'a, S: WeightStore> Loader<'a, S> {
    pub fn new(source: &'a dyn WeightSource, store: &'a mut S) -> Self {
        Loader { source, store }
    }

    /// The tensor `name` with exactly `shape`, or `None` if the source lacks it.
    pub fn optional(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, ModelError> {
        match self.source.load(name, shape)? {
            Some(t) if t.shape == shape => Ok(Some(t.data)),
            Some(t) => Err(ModelError::Shape(format!("`{name}` has shape {:?}, the config needs {shape:?}", t.shape))),
            None => Ok(None),
        }
    }

    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        self.optional(name, shape)?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    pub fn vector(&mut self, name: &str, len: usize) -> Result<<S::Family as Weights>::Vector, ModelError> {
        let data = self.tensor(name, &[len])?;
        self.store.vector(name, data)
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
        let mut data = Vec::with_capacity(rows * cols);
        let mut biases = bias.then(|| Vec::with_capacity(rows));
        for (name, part_rows) in parts {
            data.extend(self.tensor(name, &[*part_rows, cols])?);
            if let Some(b) = biases.as_mut() {
                let bias_name = format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name));
                b.extend(self.tensor(&bias_name, &[*part_rows])?);
            }
        }
        let label = parts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" + ");
        self.store.matrix(&label, rows, cols, data, biases)
    }

    /// One `[rows, cols]` matrix.
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<<S::Family as Weights>::Matrix, ModelError> {
        self.stacked(&[(name.to_string(), rows)], cols, false)
    }
}
