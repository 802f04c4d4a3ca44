//! Hugging Face model directories through `loader::load`, end to end.
//!
//! The real-model test converts the default GGUF model into a Hugging Face checkpoint (two
//! float32 safetensors shards, their index, `config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`) and checks that loading that directory gives
//! the same model: configuration, tokenizer, chat template, greedy tokens and bit-identical logits.
//! Tiny synthetic checkpoints cover float16/bfloat16 weights, Qwen2's Q/K/V biases, dummy weights
//! from a bare `config.json`, and the errors for a missing tokenizer, a missing tensor, a wrong
//! shape and an unsupported dtype.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use pagedserve::kv_cache::BlockId;
use pagedserve::loader::{self, LoadFormat};
use pagedserve::model::cpu::{CpuKvCache, CpuModel};
use pagedserve::model::sources::{GgufSource, SafetensorsSource};
use pagedserve::model::arch::hf::HfConfig;
use pagedserve::model::cpu::{CpuMatrix, CpuWeights};
use pagedserve::model::weights::{Mlp, ModelWeights};
use pagedserve::model::{Arch, ModelConfig, RopeScaling, WeightSource};
use pagedserve::runner::generate::{GenerateOptions, Generator};
use pagedserve::runner::ForwardBatch;
use pagedserve::tokenizer::ChatMessage;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use common::{loaded_model, model_path, reference};

// ---------------------------------------------------------------------------------------------
// Writing checkpoints
// ---------------------------------------------------------------------------------------------

/// Tensor names with their shapes.
type TensorList = Vec<(String, Vec<usize>)>;

/// Every tensor a Hugging Face checkpoint of `config` holds, with its shape: exactly the names
/// the decoder asks a source for.
fn hf_tensors(config: &ModelConfig) -> TensorList {
    let h = config.hidden_size;
    let (q, kv, inter) = (config.q_size(), config.kv_size(), config.intermediate_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size, h])];
    for i in 0..config.num_hidden_layers {
        let mut push = |suffix: &str, shape: Vec<usize>| out.push((format!("model.layers.{i}.{suffix}"), shape));
        push("input_layernorm.weight", vec![h]);
        push("self_attn.q_proj.weight", vec![q, h]);
        push("self_attn.k_proj.weight", vec![kv, h]);
        push("self_attn.v_proj.weight", vec![kv, h]);
        if config.attention_bias {
            push("self_attn.q_proj.bias", vec![q]);
            push("self_attn.k_proj.bias", vec![kv]);
            push("self_attn.v_proj.bias", vec![kv]);
        }
        push("self_attn.o_proj.weight", vec![h, q]);
        push("post_attention_layernorm.weight", vec![h]);
        push("mlp.gate_proj.weight", vec![inter, h]);
        push("mlp.up_proj.weight", vec![inter, h]);
        push("mlp.down_proj.weight", vec![h, inter]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![config.vocab_size, h]));
    }
    out
}

/// `config.json` as `transformers` writes it for this configuration.
fn hf_config_json(config: &ModelConfig) -> Value {
    let names = config.architecture.names();
    let eos = match config.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let mut json = json!({
        "architectures": [names.hf_class],
        "model_type": names.model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "hidden_act": "silu",
        // f32 -> JSON f64 -> f32 is exact.
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    // Qwen2's config has no such key: its Q/K/V projections always carry biases.
    if config.architecture != Arch::Qwen2 {
        json["attention_bias"] = json!(config.attention_bias);
        json["mlp_bias"] = json!(false);
    }
    json["rope_scaling"] = match &config.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings})
        }
        Some(RopeScaling::FreqFactors { .. }) => panic!("per-frequency RoPE factors have no config.json form"),
        Some(RopeScaling::Yarn { .. }) => panic!("the GGUF default model has no YaRN"),
    };
    json
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F64 => values.iter().flat_map(|&v| f64::from(v).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        other => panic!("no encoder for {other:?}"),
    }
}

/// What a float32 value becomes once stored as `dtype` and read back.
fn round_trip(values: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => values.to_vec(),
        Dtype::F16 => values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        Dtype::BF16 => values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
        other => panic!("no decoder for {other:?}"),
    }
}

/// One `.safetensors` file with `(name, shape, dtype, bytes)` tensors and `transformers`'
/// `{"format": "pt"}` metadata.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, dtype, bytes)| (name.as_str(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).unwrap();
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Logits of the last token of each prompt, all prefilled in one batch.
fn first_step_logits(model: &CpuModel, prompts: &[Vec<u32>]) -> Vec<f32> {
    let (num_blocks, block_size) = (64, 16);
    let mut cache = CpuKvCache::new(model.kv_layout(num_blocks, block_size));
    let mut batch = ForwardBatch::new(block_size, num_blocks);
    let mut next: BlockId = 0;
    for prompt in prompts {
        let n = prompt.len().div_ceil(block_size) as BlockId;
        batch.push_seq(prompt, 0, &(next..next + n).collect::<Vec<_>>(), true).unwrap();
        next += n;
    }
    model.forward(&batch, &mut cache).unwrap()
}

fn greedy(model: &CpuModel, prompts: &[Vec<u32>], max_new_tokens: usize) -> Vec<Vec<u32>> {
    let options = GenerateOptions { max_new_tokens, stop_token_ids: Vec::new(), prefill_chunk: None };
    Generator::new(model, 64, 16).generate(prompts, &options, |_, _| {}).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// `{:#}`: the error with all its context, as the CLI prints it.
fn load_error(path: &Path, format: LoadFormat) -> String {
    match loader::load(path, format) {
        Ok(_) => panic!("loading {} as {format:?} succeeded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The default model as a Hugging Face directory
// ---------------------------------------------------------------------------------------------

/// Writes the default GGUF model as a sharded float32 Hugging Face checkpoint under `dir`.
fn write_hf_directory_from_gguf(dir: &Path) {
    let gguf = loaded_model();
    let config = gguf.model.config();
    let tokenizer = gguf.tokenizer.as_ref().expect("the GGUF carries a tokenizer");
    let source = GgufSource::open(&model_path()).unwrap();

    // Weights: two shards split at the middle layer, as `save_pretrained` shards, plus the index.
    let tensors = hf_tensors(config);
    let middle = format!("model.layers.{}.", config.num_hidden_layers / 2);
    let split = tensors.iter().position(|(name, _)| name.starts_with(&middle)).unwrap();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0;
    for (k, part) in [&tensors[..split], &tensors[split..]].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let data: Vec<_> = part
            .iter()
            .map(|(name, shape)| {
                let tensor = source.load(name, shape).unwrap().unwrap_or_else(|| panic!("`{name}` is not in the GGUF"));
                assert_eq!(&tensor.shape, shape, "{name}");
                weight_map.insert(name.clone(), file.clone());
                (name.clone(), shape.clone(), Dtype::F32, encode(&tensor.data, Dtype::F32))
            })
            .collect();
        total_size += data.iter().map(|t| t.3.len()).sum::<usize>();
        write_safetensors(&dir.join(&file), &data);
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    );

    write_json(&dir.join("config.json"), &hf_config_json(config));
    tokenizer.inner().save(dir.join("tokenizer.json"), false).unwrap();
    let specials = tokenizer.special_tokens();
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": tokenizer.add_bos_token(),
            "bos_token": specials.bos_token,
            "eos_token": specials.eos_token,
            "unk_token": specials.unk_token,
            "pad_token": specials.pad_token,
            "chat_template": tokenizer.chat_template(),
            "model_max_length": config.max_position_embeddings,
        }),
    );
    // The GGUF tokenizer also stops on llama.cpp's end-of-generation control tokens; a Hugging
    // Face directory lists such extra stop ids in generation_config.json.
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": config.bos_token_id, "eos_token_id": tokenizer.eos_token_ids()}),
    );
}

#[test]
fn hugging_face_directory_matches_the_gguf_model() {
    let gguf = loaded_model();
    let config = gguf.model.config();
    let gguf_tok = gguf.tokenizer.as_ref().unwrap();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("SmolLM2-135M-Instruct-hf");
    std::fs::create_dir(&dir).unwrap();
    write_hf_directory_from_gguf(&dir);
    let shards: Vec<PathBuf> = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    let bytes: u64 = shards.iter().map(|p| p.metadata().unwrap().len()).sum();
    assert!(bytes > 4 * config.num_parameters() as u64, "two float32 shards ({bytes} bytes)");

    let hf = loader::load(&dir, LoadFormat::Auto).unwrap();
    assert_eq!(hf.name, "SmolLM2-135M-Instruct-hf");

    // Configuration: every field, RoPE and special ids included.
    assert_eq!(hf.model.config(), config);

    // Weights: the same float32 values, bit for bit.
    let (want, got) = (gguf.model.weights(), hf.model.weights());
    assert!(same_bits(&got.embed_tokens.data, &want.embed_tokens.data), "embed_tokens");
    assert!(same_bits(&got.final_norm, &want.final_norm), "final norm");
    assert!(got.lm_head.is_none() && want.lm_head.is_none(), "tied embeddings");
    for (i, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
        let ((g_gate_up, g_down), (w_gate_up, w_down)) = (dense(g), dense(w));
        for (what, a, b) in [
            ("attn_norm", &g.attn_norm, &w.attn_norm),
            ("qkv_proj", &g.qkv.data, &w.qkv.data),
            ("o_proj", &g.o_proj.data, &w.o_proj.data),
            ("ffn_norm", &g.ffn_norm, &w.ffn_norm),
            ("gate_up_proj", &g_gate_up.data, &w_gate_up.data),
            ("down_proj", &g_down.data, &w_down.data),
        ] {
            assert!(same_bits(a, b), "layer {i} {what}");
        }
        assert!(g.qkv.bias.is_none() && w.qkv.bias.is_none());
    }

    // Tokenizer: special ids, stop ids and the reference tokenizations.
    let tok = hf.tokenizer.as_ref().expect("tokenizer.json was written");
    assert_eq!(tok.vocab_size(), gguf_tok.vocab_size());
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token_id(), tok.unk_token_id(), tok.pad_token_id()),
        (gguf_tok.bos_token_id(), gguf_tok.eos_token_id(), gguf_tok.unk_token_id(), gguf_tok.pad_token_id())
    );
    assert_eq!(tok.add_bos_token(), gguf_tok.add_bos_token());
    assert_eq!(tok.eos_token_ids(), gguf_tok.eos_token_ids());
    assert_eq!(tok.special_tokens(), gguf_tok.special_tokens());
    let reference = reference();
    let cases = reference["tokenize"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want_ids = ids(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want_ids, "ids of {text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), gguf_tok.encode(text, true).unwrap(), "{text:?} with specials");
        assert_eq!(tok.decode(&want_ids, false).unwrap(), case["decoded"].as_str().unwrap(), "decode of {text:?}");
    }

    // Chat template: from tokenizer_config.json, rendering the reference examples.
    assert_eq!(tok.chat_template(), reference["chat_template"]["template"].as_str());
    for example in reference["chat_template"]["examples"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(example["messages"].clone()).unwrap();
        let add_generation_prompt = example["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            tok.apply_chat_template(&messages, add_generation_prompt).unwrap(),
            example["rendered"].as_str().unwrap()
        );
        assert_eq!(tok.encode_chat(&messages, add_generation_prompt).unwrap(), ids(&example["ids"]));
    }

    // Generation: the reference prompts, encoded by the directory's tokenizer.
    let prompts: Vec<Vec<u32>> = reference["greedy"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let prompt_ids = tok.encode(p["prompt_text"].as_str().unwrap(), false).unwrap();
            assert_eq!(prompt_ids, ids(&p["prompt_ids"]), "{:?}", p["prompt_text"]);
            prompt_ids
        })
        .collect();
    let logits = first_step_logits(&hf.model, &prompts);
    assert_eq!(logits.len(), prompts.len() * config.vocab_size);
    assert!(same_bits(&logits, &first_step_logits(&gguf.model, &prompts)), "first-step logits differ");
    let tokens = greedy(&hf.model, &prompts, 8);
    assert_eq!(tokens, greedy(&gguf.model, &prompts, 8));
    assert!(tokens.iter().all(|t| t.len() == 8));
}

// ---------------------------------------------------------------------------------------------
// Tiny synthetic checkpoints
// ---------------------------------------------------------------------------------------------

const TINY_VOCAB: usize = 300;

fn tiny_config_json(model_type: &str, tie_word_embeddings: bool) -> Value {
    json!({
        "architectures": [if model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": TINY_VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    })
}

/// Deterministic values for a tensor: norms near one, biases and matrices small.
fn synthetic_values(name: &str, n: usize) -> Vec<f32> {
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            if name.ends_with("norm.weight") {
                0.8 + 0.4 * unit
            } else {
                (unit - 0.5) * 0.2
            }
        })
        .collect()
}

/// Writes `config.json` and `model.safetensors` (the `tensors`, in `dtype`) into `dir`; returns
/// the float32 values a loader must hand back, by name.
fn write_tiny_checkpoint(
    dir: &Path,
    config_json: &Value,
    dtype: Dtype,
    tensors: &[(String, Vec<usize>)],
) -> HashMap<String, Vec<f32>> {
    write_json(&dir.join("config.json"), config_json);
    let mut expected = HashMap::new();
    let data: Vec<_> = tensors
        .iter()
        .map(|(name, shape)| {
            let values = synthetic_values(name, shape.iter().product());
            expected.insert(name.clone(), round_trip(&values, dtype));
            (name.clone(), shape.clone(), dtype, encode(&values, dtype))
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &data);
    expected
}

/// A word-level `tokenizer.json` over `t0 .. t{TINY_VOCAB - 1}` (whitespace-separated), with
/// `tokenizer_config.json` naming `t1` BOS and `t2` EOS.
fn write_tiny_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, Value> = (0..TINY_VOCAB).map(|i| (format!("t{i}"), json!(i))).collect();
    write_json(
        &dir.join("tokenizer.json"),
        &json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
        }),
    );
    write_json(&dir.join("tokenizer_config.json"), &json!({"bos_token": "t1", "eos_token": "t2", "add_bos_token": false}));
}

fn tiny_prompts() -> Vec<Vec<u32>> {
    vec![vec![5, 17, 42, 299, 3], vec![1, 250, 7]]
}

/// A dense layer's gate/up and down matrices.
fn dense(layer: &pagedserve::model::weights::LayerWeights<CpuWeights>) -> (&CpuMatrix, &CpuMatrix) {
    match &layer.mlp {
        Mlp::Dense { gate_up, down } => (gate_up, down),
        Mlp::Moe(_) => panic!("a dense layer was expected"),
    }
}

/// The configuration `config.json` describes, as the loader reads it.
fn config_of(json: &Value) -> ModelConfig {
    let hf = HfConfig::new(json.clone());
    Arch::from_hf(&hf).unwrap().config_from_hf(&hf).unwrap()
}

fn check_weights(weights: &ModelWeights<CpuWeights>, config: &ModelConfig, expected: &HashMap<String, Vec<f32>>) {
    assert!(same_bits(&weights.embed_tokens.data, &expected["model.embed_tokens.weight"]));
    assert!(same_bits(&weights.final_norm, &expected["model.norm.weight"]));
    match &weights.lm_head {
        Some(lm_head) => assert!(same_bits(&lm_head.data, &expected["lm_head.weight"])),
        None => assert!(config.tie_word_embeddings),
    }
    for (i, layer) in weights.layers.iter().enumerate() {
        let e = |suffix: &str| expected[&format!("model.layers.{i}.{suffix}")].clone();
        let qkv = [e("self_attn.q_proj.weight"), e("self_attn.k_proj.weight"), e("self_attn.v_proj.weight")].concat();
        assert!(same_bits(&layer.qkv.data, &qkv), "layer {i} qkv");
        let (gate_up, down) = dense(layer);
        let want_gate_up = [e("mlp.gate_proj.weight"), e("mlp.up_proj.weight")].concat();
        assert!(same_bits(&gate_up.data, &want_gate_up), "layer {i} gate/up");
        assert!(same_bits(&down.data, &e("mlp.down_proj.weight")), "layer {i} down");
        assert!(same_bits(&layer.o_proj.data, &e("self_attn.o_proj.weight")), "layer {i} o");
        assert!(same_bits(&layer.attn_norm, &e("input_layernorm.weight")), "layer {i} attn norm");
        assert!(same_bits(&layer.ffn_norm, &e("post_attention_layernorm.weight")), "layer {i} ffn norm");
        match &layer.qkv.bias {
            Some(bias) => {
                let want = [e("self_attn.q_proj.bias"), e("self_attn.k_proj.bias"), e("self_attn.v_proj.bias")].concat();
                assert!(same_bits(bias, &want), "layer {i} qkv bias");
            }
            None => assert!(!config.attention_bias),
        }
    }
}

fn assert_finite(logits: &[f32], what: &str) {
    assert!(!logits.is_empty() && logits.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
}

#[test]
fn half_precision_checkpoints_need_a_tokenizer_and_load_with_one() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        let json = tiny_config_json("llama", false);
        let config = config_of(&json);
        let expected = write_tiny_checkpoint(dir.path(), &json, dtype, &hf_tensors(&config));

        // Without tokenizer.json a real checkpoint cannot serve, and the error says what is missing.
        let err = load_error(dir.path(), LoadFormat::Safetensors);
        assert!(err.contains("tokenizer.json"), "{dtype:?}: {err}");
        let err = load_error(dir.path(), LoadFormat::Auto);
        assert!(err.contains("tokenizer.json"), "{dtype:?}: {err}");

        // Dummy weights need only config.json: same shape, random values, the same on every load.
        let dummy = loader::load(dir.path(), LoadFormat::Dummy).unwrap();
        assert!(dummy.tokenizer.is_none());
        assert_eq!(dummy.model.config(), &config);
        let dummy_logits = first_step_logits(&dummy.model, &tiny_prompts());
        assert_eq!(dummy_logits.len(), 2 * TINY_VOCAB);
        assert_finite(&dummy_logits, "dummy");
        let again = loader::load(&dir.path().join("config.json"), LoadFormat::Dummy).unwrap();
        assert!(same_bits(&first_step_logits(&again.model, &tiny_prompts()), &dummy_logits), "dummy weights are deterministic");
        let tokens = greedy(&dummy.model, &tiny_prompts(), 4);
        assert_eq!(tokens, greedy(&again.model, &tiny_prompts(), 4));
        assert!(tokens.iter().flatten().all(|&t| (t as usize) < TINY_VOCAB));

        // With a tokenizer the checkpoint loads, its weights widened exactly from 16 bits.
        write_tiny_tokenizer(dir.path());
        let real = loader::load(dir.path(), LoadFormat::Auto).unwrap();
        assert_eq!(real.model.config(), &config);
        check_weights(real.model.weights(), &config, &expected);
        let tok = real.tokenizer.as_ref().unwrap();
        assert_eq!(tok.encode("t5 t17 t42", false).unwrap(), vec![5, 17, 42]);
        assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
        let logits = first_step_logits(&real.model, &tiny_prompts());
        assert_finite(&logits, "checkpoint");
        assert!(!same_bits(&logits, &dummy_logits), "{dtype:?}: the checkpoint's weights are used, not dummy ones");
        assert_eq!(greedy(&real.model, &tiny_prompts(), 4).len(), 2);
    }
}

#[test]
fn qwen2_checkpoint_with_qkv_biases_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let json = tiny_config_json("qwen2", true);
    let config = config_of(&json);
    assert!(config.attention_bias, "qwen2 implies Q/K/V biases");
    let tensors = hf_tensors(&config);
    assert!(tensors.iter().any(|(name, _)| name == "model.layers.1.self_attn.k_proj.bias"));
    let expected = write_tiny_checkpoint(dir.path(), &json, Dtype::BF16, &tensors);
    write_tiny_tokenizer(dir.path());

    let loaded = loader::load(dir.path(), LoadFormat::Safetensors).unwrap();
    assert_eq!(loaded.model.config(), &config);
    check_weights(loaded.model.weights(), &config, &expected);
    assert!(loaded.model.weights().lm_head.is_none(), "tied");
    let logits = first_step_logits(&loaded.model, &tiny_prompts());
    assert_finite(&logits, "qwen2");
    assert_eq!(greedy(&loaded.model, &tiny_prompts(), 4).iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4]);

    // The biases reach the forward: without them the logits change.
    let unbiased_config = ModelConfig { attention_bias: false, ..config.clone() };
    let unbiased = CpuModel::load(unbiased_config, &SafetensorsSource::open(dir.path()).unwrap(), None).unwrap();
    assert!(!same_bits(&first_step_logits(&unbiased, &tiny_prompts()), &logits));
}

#[test]
fn missing_tensors_wrong_shapes_and_dtypes_are_named() {
    let llama = tiny_config_json("llama", false);
    let config = config_of(&llama);
    let checkpoint = |json: &Value, edit: &dyn Fn(&mut TensorList)| {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = hf_tensors(&config);
        edit(&mut tensors);
        write_tiny_checkpoint(dir.path(), json, Dtype::F32, &tensors);
        write_tiny_tokenizer(dir.path());
        dir
    };

    // A tensor left out.
    let dir = checkpoint(&llama, &|t| t.retain(|(name, _)| name != "model.layers.1.mlp.up_proj.weight"));
    let err = load_error(dir.path(), LoadFormat::Auto);
    assert!(err.contains("`model.layers.1.mlp.up_proj.weight`") && err.contains("missing"), "{err}");

    // Qwen2 needs biases a Llama checkpoint lacks.
    let mut qwen2 = llama.clone();
    qwen2["model_type"] = json!("qwen2");
    qwen2["architectures"] = json!(["Qwen2ForCausalLM"]);
    let dir = checkpoint(&qwen2, &|_| {});
    let err = load_error(dir.path(), LoadFormat::Auto);
    assert!(err.contains("`model.layers.0.self_attn.q_proj.bias`") && err.contains("missing"), "{err}");

    // A tensor of the wrong shape: both shapes are named.
    let dir = checkpoint(&llama, &|t| {
        let k = t.iter_mut().find(|(name, _)| name == "model.layers.0.self_attn.k_proj.weight").unwrap();
        assert_eq!(k.1, vec![32, 64]);
        k.1 = vec![64, 32];
    });
    let err = load_error(dir.path(), LoadFormat::Auto);
    assert!(err.contains("`model.layers.0.self_attn.k_proj.weight`"), "{err}");
    assert!(err.contains("[64, 32]") && err.contains("[32, 64]"), "{err}");

    // A dtype we do not read (float64), named with the tensor and the file.
    let dir = tempfile::tempdir().unwrap();
    write_json(&dir.path().join("config.json"), &llama);
    write_tiny_tokenizer(dir.path());
    let data: Vec<_> = hf_tensors(&config)
        .into_iter()
        .map(|(name, shape)| {
            let values = synthetic_values(&name, shape.iter().product());
            let dtype = if name == "model.norm.weight" { Dtype::F64 } else { Dtype::F32 };
            let bytes = encode(&values, dtype);
            (name, shape, dtype, bytes)
        })
        .collect();
    write_safetensors(&dir.path().join("model.safetensors"), &data);
    let err = load_error(dir.path(), LoadFormat::Auto);
    assert!(err.contains("`model.norm.weight`") && err.contains("F64") && err.contains("model.safetensors"), "{err}");
}
