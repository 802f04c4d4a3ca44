//! Every architecture llama.cpp defines, read from GGUF: each tiny transformers checkpoint of
//! `tests/fixtures/arch/` is rewritten as a GGUF file the way llama.cpp's converter lays it out
//! (its tensor names, written out here independently of `Arch::gguf_tensor_name`; Q/K rows
//! permuted for `llama`; experts stacked into one 3-D tensor; Phi-3's fused tensors; RoPE
//! settings as metadata, Llama 3's scaling as the `rope_freqs` tensor), and must load to the same
//! configuration and give the same logits as the Hugging Face directory.
//!
//! Gemma 3's GGUF metadata has no `query_pre_attn_scalar` or final soft-cap (llama.cpp scales by
//! the head size and caps nothing), and its norms carry the 1 of `(1 + w)` folded in, so its
//! checkpoint is compared with the GGUF under those two settings and within float32 rounding.

use std::path::PathBuf;

use crate::model::sources::{GgufSource, SafetensorsSource};
use crate::model::arch::hf::HfConfig;
use crate::model::arch::llama::unpermute_qk_rows;
use crate::model::cpu::{CpuKvCache, CpuModel};
use crate::model::gguf::test_writer::GgufBuilder;
use crate::model::gguf::GgufValue as V;
use crate::model::gguf::{dequantize, GgmlType};
use crate::model::parallel::TensorParallel;
use crate::model::weights::{Loader, Part, RawDtype, WeightStore, Weights};
use crate::model::{Arch, ModelConfig, ModelError, RopeScaling, WeightSource};
use crate::runner::ForwardBatch;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch").join(name)
}

/// llama.cpp's converter's name for a Hugging Face tensor (`None`: an expert, stacked apart).
fn llama_cpp_name(hf: &str, gemma3: bool) -> Option<String> {
    let fixed = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];
    if let Some((_, name)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    if part.starts_with("mlp.experts.") {
        return None;
    }
    let gemma = [
        ("post_attention_layernorm.weight", "post_attention_norm.weight"),
        ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
        ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
    ];
    if let Some((_, name)) = gemma.iter().find(|(h, _)| gemma3 && *h == part) {
        return Some(format!("blk.{layer}.{name}"));
    }
    let table = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.q_proj.bias", "attn_q.bias"),
        ("self_attn.k_proj.bias", "attn_k.bias"),
        ("self_attn.v_proj.bias", "attn_v.bias"),
        ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.gate_up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
        ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ];
    let (_, name) = table.iter().find(|(h, _)| *h == part).unwrap_or_else(|| panic!("no llama.cpp name for {hf}"));
    Some(format!("blk.{layer}.{name}"))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The permutation llama.cpp applies to `llama` Q/K rows (the inverse of `unpermute_qk_rows`).
fn permute(data: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let (rows, mut out) = (data.len() / row_len, vec![0.0; data.len()]);
    let half = rows / heads / 2;
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let (src, dst) = ((h * 2 + j) * half + i, (h * half + i) * 2 + j);
                out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    assert_eq!(unpermute_qk_rows(&out, heads, row_len), data);
    out
}

/// Q8_0 blocks of `values` (a row's length a multiple of 32): a float16 scale, 32 signed bytes.
fn q8_0_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        out.extend(half::f16::from_f32(scale).to_le_bytes());
        out.extend(block.iter().map(|v| if scale == 0.0 { 0 } else { (v / scale).round() as i8 as u8 }));
    }
    out
}

/// A tensor's GGUF type id and bytes: matrices (rows a multiple of 32 long) in `matrices`
/// (F32 or Q8_0), everything else in F32.
fn stored(matrices: GgmlType, shape: &[u64], values: &[f32]) -> (u32, Vec<u8>) {
    match matrices {
        GgmlType::Q8_0 if shape.len() >= 2 && shape[0].is_multiple_of(32) => (GgmlType::Q8_0 as u32, q8_0_bytes(values)),
        GgmlType::F32 | GgmlType::Q8_0 => (GgmlType::F32 as u32, f32_bytes(values)),
        other => panic!("fixtures are not written in {other:?}"),
    }
}

fn to_gguf(name: &str, c: &ModelConfig) -> Vec<u8> {
    to_gguf_as(name, c, GgmlType::F32)
}

/// `to_gguf` with the matrices stored as `matrices` (see `stored`).
fn to_gguf_as(name: &str, c: &ModelConfig, matrices: GgmlType) -> Vec<u8> {
    let dir = fixture(name);
    let source = SafetensorsSource::open(&dir).unwrap();
    let prefix = c.architecture.names().gguf.unwrap_or("llama");
    let key = |k: &str| format!("{prefix}.{k}");
    let mut b = GgufBuilder::new()
        .kv("general.architecture", V::String(prefix.into()))
        .kv(&key("embedding_length"), V::U32(c.hidden_size as u32))
        .kv(&key("feed_forward_length"), V::U32(c.intermediate_size as u32))
        .kv(&key("block_count"), V::U32(c.num_hidden_layers as u32))
        .kv(&key("attention.head_count"), V::U32(c.num_attention_heads as u32))
        .kv(&key("attention.head_count_kv"), V::U32(c.num_key_value_heads as u32))
        .kv(&key("attention.key_length"), V::U32(c.head_dim as u32))
        .kv(&key("attention.layer_norm_rms_epsilon"), V::F32(c.rms_norm_eps))
        .kv(&key("rope.freq_base"), V::F32(c.rope_theta))
        .kv(&key("rope.dimension_count"), V::U32(c.rotary_dim as u32))
        .kv(&key("context_length"), V::U32(c.max_position_embeddings as u32))
        .kv(&key("vocab_size"), V::U32(c.vocab_size as u32));
    if let Some(moe) = &c.moe {
        b = b
            .kv(&key("expert_count"), V::U32(moe.num_experts as u32))
            .kv(&key("expert_used_count"), V::U32(moe.top_k as u32))
            .kv(&key("expert_feed_forward_length"), V::U32(moe.expert_intermediate_size as u32))
            .kv(&key("expert_weights_norm"), V::Bool(moe.norm_topk_prob));
    }
    if let Some(w) = c.sliding_window {
        b = b.kv(&key("attention.sliding_window"), V::U32(w as u32));
    }
    if prefix == "gemma3" {
        // The fixture's layers are sliding, sliding, full, sliding: every third is global.
        assert_eq!(c.layer_types.iter().filter(|t| **t == crate::model::config::LayerType::Full).count(), 1);
        b = b.kv(&key("attention.sliding_window_pattern"), V::U32(3));
    }
    match &c.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            b = b.kv(&key("rope.scaling.type"), V::String("linear".into())).kv(&key("rope.scaling.factor"), V::F32(*factor));
        }
        Some(RopeScaling::Yarn { factor, original_max_position_embeddings, .. }) => {
            b = b
                .kv(&key("rope.scaling.type"), V::String("yarn".into()))
                .kv(&key("rope.scaling.factor"), V::F32(*factor))
                .kv(&key("rope.scaling.original_context_length"), V::U32(*original_max_position_embeddings as u32));
        }
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            // llama.cpp's converter (`LlamaModel.generate_extra_tensors`).
            let old = *original_max_position_embeddings as f32;
            let factors: Vec<f32> = (0..c.head_dim / 2)
                .map(|i| {
                    let freq = 1.0 / c.rope_theta.powf((2 * i) as f32 / c.head_dim as f32);
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < old / high_freq_factor {
                        1.0
                    } else if wavelen > old / low_freq_factor {
                        *factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect();
            b = b.tensor("rope_freqs.weight", &[factors.len() as u64], 0, f32_bytes(&factors));
        }
        Some(other) => panic!("no GGUF form written for {other:?}"),
    }
    let hf_names: Vec<String> = {
        let text = std::fs::read(dir.join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&text).unwrap();
        let mut names: Vec<String> = meta.tensors().into_keys().collect();
        names.sort();
        names
    };
    for hf in &hf_names {
        let Some(gguf) = llama_cpp_name(hf, prefix == "gemma3") else { continue };
        let mut t = source.load(hf, &[]).unwrap().unwrap();
        if prefix == "gemma3" && hf.ends_with("norm.weight") {
            // llama.cpp's converter adds Gemma's 1 to every norm weight.
            t.data.iter_mut().for_each(|v| *v += 1.0);
        }
        let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
        let data = match (prefix, hf.contains("q_proj"), hf.contains("k_proj")) {
            ("llama", true, _) => permute(&t.data, c.num_attention_heads, row_len),
            ("llama", _, true) => permute(&t.data, c.num_key_value_heads, row_len),
            _ => t.data,
        };
        let shape: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        let (ty, bytes) = stored(matrices, &shape, &data);
        b = b.tensor(&gguf, &shape, ty, bytes);
    }
    if let Some(moe) = &c.moe {
        for layer in (0..c.num_hidden_layers).filter(|l| !c.is_dense_layer(*l)) {
            for (kind, rows, cols) in [("gate", moe.expert_intermediate_size, c.hidden_size), ("up", moe.expert_intermediate_size, c.hidden_size), ("down", c.hidden_size, moe.expert_intermediate_size)] {
                let mut stacked = Vec::new();
                for e in 0..moe.num_experts {
                    let name = format!("model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight");
                    stacked.extend(source.load(&name, &[]).unwrap().unwrap().data);
                }
                let shape = [cols as u64, rows as u64, moe.num_experts as u64];
                let (ty, bytes) = stored(matrices, &shape, &stacked);
                b = b.tensor(&format!("blk.{layer}.ffn_{kind}_exps.weight"), &shape, ty, bytes);
            }
        }
    }
    b.build()
}

fn logits(model: &CpuModel, prompt: &[u32]) -> Vec<f32> {
    let (block_size, num_blocks) = (4, prompt.len().div_ceil(4));
    let mut batch = ForwardBatch::new(block_size, num_blocks);
    let table: Vec<u32> = (0..num_blocks as u32).collect();
    for (i, &t) in prompt.iter().enumerate() {
        batch.push_seq(&[t], i, &table, true).unwrap();
    }
    model.forward(&batch, &mut CpuKvCache::new(model.kv_layout(num_blocks, block_size))).unwrap()
}

/// What a device store gets from `raw` (stored blocks, plus the Q/K rows to put back) expands to
/// exactly what `load` gives, for every matrix of the checkpoint, experts included.
fn raw_blocks_match_the_loaded_tensors(name: &str, dir: &std::path::Path, gguf: &GgufSource) {
    let file = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + header_len]).unwrap();
    let mut matrices = 0;
    for (tensor, info) in header.as_object().unwrap() {
        let shape: Vec<usize> = match info.get("shape") {
            Some(s) => s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            None => continue,
        };
        if shape.len() != 2 || tensor.ends_with("norm.weight") {
            continue;
        }
        let raw = gguf.raw(tensor).unwrap().unwrap_or_else(|| panic!("{name}: `{tensor}` has no raw blocks"));
        assert_eq!(raw.shape, shape, "{name}: {tensor}");
        let RawDtype::Ggml(ty) = raw.dtype else { panic!("{name}: {tensor} is not ggml blocks") };
        let n = shape.iter().product();
        let mut values = vec![0.0f32; n];
        dequantize(ty, raw.bytes, n, &mut values).unwrap();
        if let Some(head_dim) = raw.interleaved_qk_head_dim {
            values = unpermute_qk_rows(&values, shape[0] / head_dim, shape[1]);
        }
        assert_eq!(values, gguf.load(tensor, &shape).unwrap().unwrap().data, "{name}: {tensor}");
        matrices += 1;
    }
    assert!(matrices > 0, "{name}");
}

#[test]
fn every_fixture_rewritten_as_gguf_loads_to_the_same_model() {
    let prompt: Vec<u32> = (0..21u32).map(|i| (i * 97 + 13) % 2048).collect();
    for name in ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "qwen3_moe"] {
        let dir = fixture(name);
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let hf = HfConfig::new(json);
        let mut config = Arch::from_hf(&hf).unwrap().config_from_hf(&hf).unwrap();
        if name == "gemma3" {
            // What the GGUF form can say (see the module doc).
            config.query_scale = 1.0 / (config.head_dim as f32).sqrt();
            config.final_logit_softcapping = None;
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), to_gguf(name, &config)).unwrap();
        let gguf = GgufSource::open(file.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut gguf_config = gguf.config().unwrap();
        // Mistral is `llama` in GGUF; special ids come from the tokenizer metadata.
        assert_eq!(gguf_config.architecture, if name == "mistral" { Arch::Llama } else { config.architecture }, "{name}");
        gguf_config.architecture = config.architecture;
        let expected = ModelConfig { bos_token_id: None, eos_token_ids: Vec::new(), ..config.clone() };
        if name != "llama" {
            assert_eq!(gguf_config, expected, "{name}: configuration");
        }
        let from_hf = CpuModel::load(config.clone(), &SafetensorsSource::open(&dir).unwrap(), None).unwrap();
        raw_blocks_match_the_loaded_tensors(name, &dir, &gguf);
        let from_gguf = CpuModel::load(gguf_config, &gguf, None).unwrap();
        let (want, got) = (logits(&from_hf, &prompt), logits(&from_gguf, &prompt));
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = want.iter().zip(&got).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        // Bit-identical weights, except Llama 3's RoPE, which GGUF carries as divisors, and
        // Gemma's norms, whose 1 goes in and out again.
        let tolerance = if name == "llama" || name == "gemma3" { 1e-4 } else { 0.0 };
        assert!(err <= tolerance, "{name}: GGUF logits differ from the checkpoint's by {err:e}");
    }
}

/// A store that keeps nothing and checks what a shard reads of each matrix part whose stored
/// bytes the source lends: its selection converted from those bytes alone
/// (`RawTensor::selected_f32`, what `Part::f32` and the device store read), against the same
/// values cut from the whole tensor's float32 (`WeightSource::load`). Parts whose columns split
/// blocks are read from the whole tensor by both stores, so only counted.
#[derive(Default)]
struct RawSliceCheck {
    checked: usize,
    column_cuts: usize,
    interleaved: usize,
    split_blocks: usize,
}

impl Weights for RawSliceCheck {
    type Matrix = ();
    type Vector = ();
}

impl RawSliceCheck {
    fn check(&mut self, part: &Part<'_>) -> Result<(), ModelError> {
        let Some(raw) = part.raw()? else { return Ok(()) };
        let Some(values) = raw.selected_f32(&part.selection)? else {
            self.split_blocks += 1;
            return Ok(());
        };
        assert_eq!(values, part.f32_of_whole_tensor()?, "`{}` {:?}", part.name, part.selection);
        assert_eq!(values, part.f32()?, "`{}`: what the CPU store keeps", part.name);
        self.checked += 1;
        self.column_cuts += usize::from(part.selected_shape().1 != part.cols);
        self.interleaved += usize::from(raw.interleaved_qk_head_dim.is_some() && !part.is_whole());
        Ok(())
    }
}

impl WeightStore for RawSliceCheck {
    type Family = RawSliceCheck;
    const BYTES_PER_ELEMENT: u64 = 4;

    fn matrix(&mut self, _: &str, _: usize, _: usize, parts: &[Part<'_>], _: Option<&[Part<'_>]>) -> Result<(), ModelError> {
        parts.iter().try_for_each(|part| self.check(part))
    }

    fn vector(&mut self, _: &Part<'_>) -> Result<(), ModelError> {
        Ok(())
    }
}

/// Every rank of worlds 2 and 4 of every fixture, from its bfloat16 safetensors and from GGUF in
/// F32 and Q8_0 (llama's Q/K rows interleaved): a device store would get the CPU shard's values.
#[test]
fn every_ranks_sliced_stored_bytes_expand_to_the_cpu_shards_values() {
    let mut totals = RawSliceCheck::default();
    for name in ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "qwen3_moe"] {
        let dir = fixture(name);
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let hf = HfConfig::new(json);
        let config = Arch::from_hf(&hf).unwrap().config_from_hf(&hf).unwrap();
        let mut sources: Vec<(Box<dyn WeightSource>, ModelConfig)> = vec![(Box::new(SafetensorsSource::open(&dir).unwrap()), config.clone())];
        for matrices in [GgmlType::F32, GgmlType::Q8_0] {
            let gguf = GgufSource::from_file(crate::model::gguf::GgufFile::from_bytes(to_gguf_as(name, &config, matrices)).unwrap()).unwrap();
            let gguf_config = gguf.config().unwrap();
            sources.push((Box::new(gguf), gguf_config));
        }
        for (source, config) in &sources {
            for world in [2, 4] {
                for parallel in TensorParallel::ranks(world).unwrap() {
                    let mut store = RawSliceCheck::default();
                    config.architecture.load(config, &mut Loader::new(source.as_ref(), &mut store).with_shard(parallel)).unwrap_or_else(|e| panic!("{name} {parallel:?}: {e}"));
                    assert!(store.checked > 0, "{name} {parallel:?}");
                    totals.checked += store.checked;
                    totals.column_cuts += store.column_cuts;
                    totals.interleaved += store.interleaved;
                    totals.split_blocks += store.split_blocks;
                }
            }
        }
    }
    // Column-parallel and row-parallel slices, shards of interleaved heads, and Q8_0 columns
    // that split blocks were all met.
    assert!(totals.column_cuts > 0 && totals.interleaved > 0 && totals.split_blocks > 0, "{:?}", (totals.checked, totals.column_cuts, totals.interleaved, totals.split_blocks));
}
