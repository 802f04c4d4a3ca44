//! Checks the GGUF reader against the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF)
//! and the reference values in `shared/reference/smollm2_subset.json` (computed with gguf-py
//! and transformers).
//!
//! The model path comes from `PAGEDSERVE_MODEL`, else `<repo>/models/...`; the reference from
//! `PAGEDSERVE_REFERENCE`, else `<repo>/../shared/reference/smollm2_subset.json`. A missing
//! model fails the tests (run `scripts/fetch-model.sh`); nothing is skipped silently.

mod common;

use std::sync::OnceLock;

use common::{model_path, reference};
use pagedserve::model::gguf::{GgmlType, GgufFile};

fn model() -> &'static GgufFile {
    static MODEL: OnceLock<GgufFile> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model_path();
        assert!(
            path.is_file(),
            "model not found at {}: run scripts/fetch-model.sh (or set PAGEDSERVE_MODEL)",
            path.display()
        );
        GgufFile::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    })
}

fn config_u64(key: &str) -> u64 {
    reference()["config"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("reference config.{key}"))
}

#[test]
fn header_and_metadata_match_the_reference_config() {
    let f = model();
    let size = std::fs::metadata(model_path()).unwrap().len();
    assert_eq!(size, reference()["gguf_size_bytes"].as_u64().unwrap());
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.get_str("general.architecture"), Some("llama"));

    assert_eq!(f.get_u64("llama.block_count"), Some(30));
    assert_eq!(
        f.get_u64("llama.block_count"),
        Some(config_u64("num_hidden_layers"))
    );
    assert_eq!(
        f.get_u64("llama.embedding_length"),
        Some(config_u64("hidden_size"))
    );
    assert_eq!(
        f.get_u64("llama.feed_forward_length"),
        Some(config_u64("intermediate_size"))
    );
    assert_eq!(
        f.get_u64("llama.attention.head_count"),
        Some(config_u64("num_attention_heads"))
    );
    assert_eq!(
        f.get_u64("llama.attention.head_count_kv"),
        Some(config_u64("num_key_value_heads"))
    );
    assert_eq!(
        f.get_u64("llama.context_length"),
        Some(config_u64("max_position_embeddings"))
    );
    assert_eq!(
        f.get_u64("llama.rope.dimension_count"),
        Some(config_u64("head_dim"))
    );
    assert_eq!(
        f.get_u64("llama.vocab_size"),
        Some(config_u64("vocab_size"))
    );
    let config = &reference()["config"];
    assert_eq!(
        f.get_f64("llama.rope.freq_base"),
        config["rope_theta"].as_f64()
    );
    assert_eq!(
        f.get_f64("llama.attention.layer_norm_rms_epsilon"),
        config["rms_norm_eps"].as_f64()
    );

    let tokens = f
        .get_str_array("tokenizer.ggml.tokens")
        .expect("token strings");
    assert_eq!(tokens.len(), 49152);
    assert_eq!(
        &tokens[..3],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    assert_eq!(
        f.get_i64_array("tokenizer.ggml.token_type").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert_eq!(f.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("smollm"));
    assert_eq!(
        f.get_u64("tokenizer.ggml.bos_token_id"),
        Some(config_u64("bos_token_id"))
    );
    assert_eq!(
        f.get_u64("tokenizer.ggml.eos_token_id"),
        Some(config_u64("eos_token_id"))
    );
    assert_eq!(
        f.get_u64("tokenizer.ggml.padding_token_id"),
        Some(config_u64("pad_token_id"))
    );
    assert_eq!(f.get_u64("tokenizer.ggml.unknown_token_id"), Some(0));
    assert_eq!(
        f.get_bool("tokenizer.ggml.add_bos_token"),
        config["tokenizer_add_bos_token"].as_bool()
    );
    assert_eq!(
        f.get_str("tokenizer.chat_template"),
        reference()["chat_template"]["template"].as_str()
    );
}

#[test]
fn tensor_infos_are_consistent() {
    let f = model();
    let tensors = f.tensors();
    assert_eq!(tensors.len(), 272);
    assert_eq!(tensors[0].name, "token_embd.weight");
    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.shape, [576, 49152]);
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.n_bytes(), 576 * 49152 / 32 * 34);
    assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().shape, [576, 576]);
    assert_eq!(f.tensor("blk.0.attn_k.weight").unwrap().shape, [576, 192]);
    assert_eq!(
        f.tensor("blk.29.ffn_down.weight").unwrap().shape,
        [1536, 576]
    );
    assert_eq!(f.tensor("output_norm.weight").unwrap().shape, [576]);
    assert!(f.tensor("output.weight").is_none(), "embeddings are tied");

    let count = |ty| tensors.iter().filter(|t| t.ggml_type == ty).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );
    for t in tensors {
        assert_eq!(f.tensor_data(t).len(), t.n_bytes(), "{}", t.name);
        assert_eq!(t.offset % f.alignment(), 0, "{}", t.name);
    }
}

#[test]
fn weight_probes_match_the_reference() {
    let f = model();
    let probes = reference()["weight_probes"]
        .as_array()
        .expect("weight_probes");
    assert!(!probes.is_empty());
    for probe in probes {
        let name = probe["gguf_name"].as_str().unwrap();
        let info = f.tensor(name).unwrap_or_else(|| panic!("tensor {name}"));
        assert_eq!(
            info.ggml_type.name(),
            probe["gguf_type"].as_str().unwrap(),
            "{name}"
        );
        // hf_shape is [rows, cols], the reverse of ggml's [ne0, ne1].
        let hf_shape: Vec<usize> = probe["hf_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let ggml_shape: Vec<usize> = hf_shape.iter().rev().copied().collect();
        assert_eq!(info.shape, ggml_shape, "{name}");

        let values = f.dequantize(name).unwrap();
        assert_eq!(values.len(), info.n_elements());
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let abs_sum: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
        for (what, got, key) in [("sum", sum, "sum"), ("abs_sum", abs_sum, "abs_sum")] {
            let want = probe[key].as_f64().unwrap();
            let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
            assert!(
                rel <= 1e-6,
                "{name}: {what} {got} vs reference {want} (relative {rel:e})"
            );
        }
        let first8: Vec<f32> = probe["first8"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&values[..8], &first8[..], "{name}: first8");
    }
}

#[test]
fn every_tensor_dequantizes_to_finite_values() {
    let f = model();
    for t in f.tensors() {
        let values = f.dequantize(&t.name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(values.len(), t.n_elements(), "{}", t.name);
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{}: non-finite value",
            t.name
        );
    }
}
