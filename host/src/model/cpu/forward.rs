//! The CPU backend's `Ops`: one forward over a `ForwardBatch`, in float32, with activations in an
//! arena of row-major buffers that are reused as the architecture frees them.
//!
//! Every product goes through `matmul::matmul_wt`, whose accumulation order does not depend on
//! the number of rows, so a token's logits are bit-for-bit the same whatever shares its batch
//! (the mixture of experts included: each expert's rows are independent of which other tokens
//! chose it).
//!
//! A tensor-parallel rank's ops hold its `Communicator` (`cpu::parallel`) for the collectives;
//! without one (world 1) they do nothing.

use rayon::prelude::*;

use super::attention::{paged_attention, AttentionShape};
use super::kv_storage::CpuKvCache;
use super::matmul::matmul_wt;
use super::ops::{gelu_tanh_mul, rms_norm_scaled, silu_mul};
use super::parallel::Communicator;
use super::weights::{CpuMatrix, CpuWeights};
use crate::model::config::{Activation, LayerAttention, MoeConfig};
use crate::model::ops::{Act, Norm, Ops};
use crate::model::rope::Rope;
use crate::model::weights::MoeWeights;
use crate::model::{ModelConfig, ModelError};
use crate::runner::ForwardBatch;

pub struct CpuOps<'a> {
    config: &'a ModelConfig,
    ropes: &'a [Rope],
    batch: &'a ForwardBatch,
    cache: &'a mut CpuKvCache,
    /// Live activations by handle; `None` once freed.
    acts: Vec<Option<Vec<f32>>>,
    /// Freed buffers, reused by later activations.
    spare: Vec<Vec<f32>>,
    /// Per RoPE table, the cosines and sines of every token's position (made on first use).
    cos_sin: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    logits: Vec<f32>,
    /// The other tensor-parallel ranks; `None` at world 1.
    communicator: Option<Communicator<'a>>,
}

impl<'a> CpuOps<'a> {
    pub fn new(config: &'a ModelConfig, ropes: &'a [Rope], batch: &'a ForwardBatch, cache: &'a mut CpuKvCache) -> Self {
        CpuOps {
            config,
            ropes,
            batch,
            cache,
            acts: Vec::new(),
            spare: Vec::new(),
            cos_sin: vec![None; ropes.len()],
            logits: Vec::new(),
            communicator: None,
        }
    }

    /// The ops of one tensor-parallel rank, meeting the others through `communicator`.
    pub fn with_communicator(mut self, communicator: Option<Communicator<'a>>) -> Self {
        self.communicator = communicator;
        self
    }

    /// The logits `[batch.logits_rows.len(), vocab]` the forward ended with.
    pub fn into_logits(self) -> Vec<f32> {
        self.logits
    }

    fn n(&self) -> usize {
        self.batch.num_tokens()
    }

    /// A new activation of `width` columns. Its contents are stale (a reused buffer is not
    /// cleared): every operation writes the whole of its output.
    fn alloc(&mut self, width: usize) -> Act {
        let len = self.n() * width;
        let mut buffer = self.spare.pop().unwrap_or_default();
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        buffer.truncate(len);
        self.acts.push(Some(buffer));
        Act(self.acts.len() - 1)
    }

    fn get(&self, act: Act) -> Result<&Vec<f32>, ModelError> {
        self.acts.get(act.0).and_then(Option::as_ref).ok_or_else(|| freed(act))
    }

    /// Takes an activation's buffer out to be written while others are read; `put` returns it.
    fn take(&mut self, act: Act) -> Result<Vec<f32>, ModelError> {
        self.acts.get_mut(act.0).and_then(Option::take).ok_or_else(|| freed(act))
    }

    fn put(&mut self, act: Act, buffer: Vec<f32>) {
        self.acts[act.0] = Some(buffer);
    }

    /// `x += delta`, element by element (a thread pool costs more than it saves on rows this
    /// cheap).
    fn add_into(&mut self, x: Act, delta: Act) -> Result<(), ModelError> {
        let mut values = self.take(x)?;
        for (a, b) in values.iter_mut().zip(self.get(delta)?) {
            *a += b;
        }
        self.put(x, values);
        Ok(())
    }

    fn width(&self, act: Act) -> Result<usize, ModelError> {
        Ok(self.get(act)?.len() / self.n().max(1))
    }

    fn cos_sin(&mut self, table: usize) -> (&[f32], &[f32]) {
        if self.cos_sin[table].is_none() {
            let half = self.config.rotary_dim / 2;
            let n = self.n();
            let (mut cos, mut sin) = (vec![0.0f32; n * half], vec![0.0f32; n * half]);
            for ((c, s), &pos) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).zip(&self.batch.positions) {
                self.ropes[table].cos_sin(pos, c, s);
            }
            self.cos_sin[table] = Some((cos, sin));
        }
        let (cos, sin) = self.cos_sin[table].as_ref().expect("made above");
        (cos, sin)
    }
}

fn freed(act: Act) -> ModelError {
    ModelError::Input(format!("activation {} used after it was freed", act.0))
}

/// `out = x · wᵀ + bias` for `rows` rows.
fn linear_rows(out: &mut [f32], x: &[f32], w: &CpuMatrix, rows: usize) {
    matmul_wt(out, x, &w.data, rows, w.cols, w.rows);
    if let Some(bias) = &w.bias {
        out.par_chunks_mut(w.rows).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
    }
}

fn norm_rows(out: &mut [f32], x: &[f32], weight: &[f32], norm: Norm) {
    let h = weight.len();
    let offset = if norm.unit_offset { 1.0 } else { 0.0 };
    out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(o, row)| rms_norm_scaled(o, row, weight, offset, norm.eps));
}

fn activate(out: &mut [f32], gate_up: &[f32], activation: Activation) {
    match activation {
        Activation::Silu => silu_mul(out, gate_up),
        Activation::GeluTanh => gelu_tanh_mul(out, gate_up),
    }
}

/// `rows` rows of every rank's columns side by side: each of `parts` holds `rows` rows of its own
/// width.
fn concat_columns(parts: &[Vec<f32>], rows: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for row in 0..rows {
        for part in parts {
            let width = part.len() / rows;
            out.extend_from_slice(&part[row * width..][..width]);
        }
    }
    out
}

fn softcap(values: &mut [f32], cap: Option<f32>) {
    if let Some(cap) = cap {
        values.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
    }
}

impl Ops for CpuOps<'_> {
    type Family = CpuWeights;

    fn free(&mut self, act: Act) {
        if let Some(buffer) = self.acts.get_mut(act.0).and_then(Option::take) {
            self.spare.push(buffer);
        }
    }

    fn embed(&mut self, table: &CpuMatrix, first_token: usize, multiplier: Option<f32>) -> Result<Act, ModelError> {
        let h = table.cols;
        let vocab = self.config.vocab_size;
        if let Some(&bad) = self.batch.token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let out = self.alloc(h);
        let mut x = self.take(out)?;
        for (row, &token) in x.chunks_exact_mut(h).zip(&self.batch.token_ids) {
            match (token as usize).checked_sub(first_token).filter(|&at| at < table.rows) {
                Some(at) => {
                    row.copy_from_slice(table.rows(at, 1));
                    if let Some(m) = multiplier {
                        row.iter_mut().for_each(|v| *v *= m);
                    }
                }
                None => row.fill(0.0),
            }
        }
        self.put(out, x);
        Ok(out)
    }

    fn all_reduce(&mut self, act: Act) -> Result<(), ModelError> {
        let Some(communicator) = self.communicator else { return Ok(()) };
        let mut values = self.take(act)?;
        let summed = communicator.all_reduce(&mut values);
        self.put(act, values);
        summed
    }

    fn all_gather_logits(&mut self) -> Result<(), ModelError> {
        let Some(communicator) = self.communicator else { return Ok(()) };
        let ranges = communicator.all_gather(&self.logits)?;
        self.logits = concat_columns(&ranges, self.batch.logits_rows.len());
        Ok(())
    }

    fn add_norm(&mut self, residual: Act, delta: Option<Act>, weight: &Vec<f32>, norm: Norm) -> Result<Act, ModelError> {
        if let Some(delta) = delta {
            self.add_into(residual, delta)?;
        }
        self.norm(residual, weight, norm)
    }

    fn norm(&mut self, x: Act, weight: &Vec<f32>, norm: Norm) -> Result<Act, ModelError> {
        let out = self.alloc(weight.len());
        let mut o = self.take(out)?;
        norm_rows(&mut o, self.get(x)?, weight, norm);
        self.put(out, o);
        Ok(out)
    }

    fn linear(&mut self, x: Act, w: &CpuMatrix) -> Result<Act, ModelError> {
        if self.width(x)? != w.cols {
            return Err(ModelError::Shape(format!("a [{}]-wide input to a [{}, {}] matrix", self.width(x)?, w.rows, w.cols)));
        }
        let out = self.alloc(w.rows);
        let mut o = self.take(out)?;
        linear_rows(&mut o, self.get(x)?, w, self.n());
        self.put(out, o);
        Ok(out)
    }

    fn head_norm(&mut self, qkv: Act, first_head: usize, num_heads: usize, weight: &Vec<f32>, norm: Norm) -> Result<(), ModelError> {
        let width = self.width(qkv)?;
        let hd = weight.len();
        let offset = if norm.unit_offset { 1.0 } else { 0.0 };
        let mut rows = self.take(qkv)?;
        rows.par_chunks_mut(width).for_each_init(
            || vec![0.0f32; hd],
            |input, row| {
                for head in row[first_head * hd..(first_head + num_heads) * hd].chunks_exact_mut(hd) {
                    input.copy_from_slice(head);
                    rms_norm_scaled(head, input, weight, offset, norm.eps);
                }
            },
        );
        self.put(qkv, rows);
        Ok(())
    }

    fn rope_and_cache(&mut self, qkv: Act, layer: usize, attention: &LayerAttention) -> Result<(), ModelError> {
        let c = self.config;
        let (q_size, kv_size, hd) = (c.q_size(), c.kv_size(), c.head_dim);
        let width = q_size + 2 * kv_size;
        let mut rows = self.take(qkv)?;
        let half = c.rotary_dim / 2;
        let (cos, sin) = self.cos_sin(attention.rope);
        rows.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
            Rope::apply(&mut row[..q_size + kv_size], hd, &cos[t * half..][..half], &sin[t * half..][..half]);
        });
        for (t, row) in rows.chunks_exact(width).enumerate() {
            let (keys, values) = row[q_size..].split_at(kv_size);
            self.cache.write(layer, self.batch.slot_mapping[t] as usize, keys, values);
        }
        self.put(qkv, rows);
        Ok(())
    }

    fn attention(&mut self, qkv: Act, layer: usize, attention: &LayerAttention) -> Result<Act, ModelError> {
        let c = self.config;
        let out = self.alloc(c.q_size());
        let mut o = self.take(out)?;
        let layout = *self.cache.layout();
        let (keys, values) = self.cache.layer(layer);
        let shape = AttentionShape { num_heads: c.num_attention_heads, q_stride: c.qkv_size(), layer: *attention };
        paged_attention(&mut o, self.get(qkv)?, self.batch, keys, values, &layout, &shape);
        self.put(out, o);
        Ok(out)
    }

    fn gated_activation(&mut self, gate_up: Act, activation: Activation) -> Result<Act, ModelError> {
        let inter = self.width(gate_up)? / 2;
        let out = self.alloc(inter);
        let mut o = self.take(out)?;
        o.par_chunks_mut(inter).zip(self.get(gate_up)?.par_chunks(2 * inter)).for_each(|(o, gu)| activate(o, gu, activation));
        self.put(out, o);
        Ok(out)
    }

    fn moe(&mut self, x: Act, weights: &MoeWeights<CpuWeights>, config: &MoeConfig, activation: Activation) -> Result<Act, ModelError> {
        let n = self.n();
        let (experts, top_k, inter) = (config.num_experts, config.top_k, config.expert_intermediate_size);
        let input = self.get(x)?;
        let h = input.len() / n.max(1);
        let mut router = vec![0.0f32; n * experts];
        linear_rows(&mut router, input, &weights.router, n);
        // Per token, its experts and their weights (transformers' order: softmax, top-k, then
        // the optional renormalisation).
        let mut chosen: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
        for (t, logits) in router.chunks_exact(experts).enumerate() {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
            let top = &order[..top_k];
            let top_sum: f32 = top.iter().map(|&e| exp[e] / total).sum();
            for &e in top {
                let p = exp[e] / total;
                chosen[e].push((t, if config.norm_topk_prob { p / top_sum } else { p }));
            }
        }
        let mut out = vec![0.0f32; n * h];
        for (e, tokens) in chosen.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            let m = tokens.len();
            let gathered: Vec<f32> = tokens.iter().flat_map(|&(t, _)| input[t * h..(t + 1) * h].iter().copied()).collect();
            let mut gate_up = vec![0.0f32; m * 2 * inter];
            matmul_wt(&mut gate_up, &gathered, weights.gate_up.rows(e * 2 * inter, 2 * inter), m, h, 2 * inter);
            let mut act = vec![0.0f32; m * inter];
            act.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| activate(o, gu, activation));
            let mut down = vec![0.0f32; m * h];
            matmul_wt(&mut down, &act, weights.down.rows(e * h, h), m, inter, h);
            for (&(t, weight), row) in tokens.iter().zip(down.chunks_exact(h)) {
                out[t * h..(t + 1) * h].iter_mut().zip(row).for_each(|(o, v)| *o += weight * v);
            }
        }
        let act = self.alloc(h);
        self.put(act, out);
        Ok(act)
    }

    fn logits(
        &mut self,
        residual: Act,
        delta: Option<Act>,
        final_norm: &Vec<f32>,
        norm: Norm,
        lm_head: &CpuMatrix,
        cap: Option<f32>,
    ) -> Result<(), ModelError> {
        let h = final_norm.len();
        if let Some(delta) = delta {
            self.add_into(residual, delta)?;
        }
        let x = self.take(residual)?;
        let rows = &self.batch.logits_rows;
        let mut selected = vec![0.0f32; rows.len() * h];
        for (out, &row) in selected.chunks_exact_mut(h).zip(rows) {
            out.copy_from_slice(&x[row * h..][..h]);
        }
        let mut normed = vec![0.0f32; selected.len()];
        norm_rows(&mut normed, &selected, final_norm, norm);
        let mut logits = vec![0.0f32; rows.len() * lm_head.rows];
        linear_rows(&mut logits, &normed, lm_head, rows.len());
        softcap(&mut logits, cap);
        self.put(residual, x);
        self.logits = logits;
        Ok(())
    }
}
