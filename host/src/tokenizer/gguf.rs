//! Building a `tokenizers::Tokenizer` from GGUF tokenizer metadata.
//!
//! GGUF files carry the vocabulary in `tokenizer.ggml.*` keys instead of a `tokenizer.json`.
//! [`GgufTokenizerSpec`] is the plain description of those keys; [`build_tokenizer`] turns it
//! into the equivalent Hugging Face tokenizer pipeline assembled from the `tokenizers` crate's
//! own building blocks:
//!
//! * `gpt2` (byte-level BPE): BPE over vocab + merges, a pre-tokenizer chosen by
//!   `tokenizer.ggml.pre` (mirroring llama.cpp's `llama-vocab.cpp` regexes and the original
//!   `tokenizer.json` files), the byte-level decoder.
//! * `llama` (SentencePiece): BPE with byte fallback whose merges are derived from the
//!   vocabulary ranked by piece score (as `transformers`' `SentencePieceExtractor` does for
//!   `LlamaTokenizerFast`), the `▁` normalizer and the SPM decoder chain.
//!
//! Control (3), unknown (2) and user-defined (4) tokens become added tokens, so they are
//! recognised verbatim in input text (`<|im_start|>` encodes to its single id).

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::TokenizerError;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// An ordinary vocabulary piece.
    pub const NORMAL: i32 = 1;
    /// The unknown token (`<unk>`).
    pub const UNKNOWN: i32 = 2;
    /// A control token (`<s>`, `<|im_start|>`, ...): special, skipped when decoding with
    /// `skip_special_tokens`.
    pub const CONTROL: i32 = 3;
    /// A user-defined token: matched verbatim in text, but decoded like normal text.
    pub const USER_DEFINED: i32 = 4;
    /// An unused slot.
    pub const UNUSED: i32 = 5;
    /// A byte-fallback token `<0xNN>`.
    pub const BYTE: i32 = 6;
}

/// What GGUF metadata says about the tokenizer (`tokenizer.ggml.*` keys and
/// `tokenizer.chat_template`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: `"smollm"`, `"llama-bpe"`, `"qwen2"`, `"default"`, ...
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by token id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (see [`token_type`]); may be empty (all normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges` (`"a b"`), empty for `llama`.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (`llama`), may be empty.
    pub scores: Vec<f32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufTokenizerSpec {
    /// Reads the `tokenizer.*` keys of a GGUF file.
    pub fn from_gguf(file: &crate::model::gguf::GgufFile) -> Result<Self, TokenizerError> {
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| TokenizerError::InvalidSpec("GGUF: `tokenizer.ggml.model` is missing".into()))?
            .to_string();
        let tokens = file
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| TokenizerError::InvalidSpec("GGUF: `tokenizer.ggml.tokens` is missing".into()))?
            .into_iter()
            .map(str::to_string)
            .collect();
        let id = |key: &str| file.get_u64(key).and_then(|v| u32::try_from(v).ok());
        Ok(GgufTokenizerSpec {
            model,
            pre: file.get_str("tokenizer.ggml.pre").map(str::to_string),
            tokens,
            token_types: file
                .get_i64_array("tokenizer.ggml.token_type")
                .map(|types| types.into_iter().map(|t| t as i32).collect())
                .unwrap_or_default(),
            merges: file
                .get_str_array("tokenizer.ggml.merges")
                .map(|merges| merges.into_iter().map(str::to_string).collect())
                .unwrap_or_default(),
            scores: file.get_f32_array("tokenizer.ggml.scores").unwrap_or_default(),
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_id: id("tokenizer.ggml.eos_token_id"),
            unknown_token_id: id("tokenizer.ggml.unknown_token_id"),
            padding_token_id: id("tokenizer.ggml.padding_token_id"),
            add_bos_token: file.get_bool("tokenizer.ggml.add_bos_token"),
            add_eos_token: file.get_bool("tokenizer.ggml.add_eos_token"),
            add_space_prefix: file.get_bool("tokenizer.ggml.add_space_prefix"),
            chat_template: file.get_str("tokenizer.chat_template").map(str::to_string),
        })
    }

    /// The token type of `id`, [`token_type::NORMAL`] when the GGUF has no type array.
    pub fn token_type(&self, id: usize) -> i32 {
        self.token_types
            .get(id)
            .copied()
            .unwrap_or(token_type::NORMAL)
    }

    /// Whether a BOS token is prepended by `encode(text, add_special_tokens = true)`.
    /// llama.cpp's defaults: true for SentencePiece (`llama`), false for byte-level BPE.
    pub fn effective_add_bos(&self) -> bool {
        self.add_bos_token.unwrap_or(self.model == "llama")
    }

    /// Whether an EOS token is appended by `encode(text, add_special_tokens = true)`.
    pub fn effective_add_eos(&self) -> bool {
        self.add_eos_token.unwrap_or(false)
    }

    fn token_text(
        &self,
        id: Option<u32>,
        what: &str,
    ) -> Result<Option<(String, u32)>, TokenizerError> {
        match id {
            None => Ok(None),
            Some(id) => match self.tokens.get(id as usize) {
                Some(t) => Ok(Some((t.clone(), id))),
                None => Err(TokenizerError::InvalidSpec(format!(
                    "{what} token id {id} is outside the vocabulary of {} tokens",
                    self.tokens.len()
                ))),
            },
        }
    }
}

/// The Llama 3 (`llama-bpe`) pre-tokenizer regex.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer regex: Llama 3's with single digits.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer families we know, keyed by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// GPT-2 regex (the byte-level pre-tokenizer's own).
    Gpt2,
    /// Every digit split off individually, then the GPT-2 regex (SmolLM, StarCoder, ...).
    IndividualDigits,
    /// The Llama 3 regex.
    Llama3,
    /// The Qwen2 regex.
    Qwen2,
}

impl PreTokenizerKind {
    /// Map a `tokenizer.ggml.pre` value to its family; unknown names fall back to GPT-2 with a
    /// warning. The aliases follow llama.cpp's grouping of pre types sharing one regex set.
    pub fn from_pre(pre: Option<&str>) -> Self {
        match pre.unwrap_or("default") {
            "default" | "gpt2" | "gpt-2" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Self::IndividualDigits,
            "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" | "megrez" => Self::Qwen2,
            other => {
                tracing::warn!(
                    pre = other,
                    "unknown tokenizer.ggml.pre; falling back to the GPT-2 pre-tokenizer regex"
                );
                Self::Gpt2
            }
        }
    }

    /// The pre-tokenizer the original `tokenizer.json` of this family uses.
    pub fn pre_tokenizer(self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let byte_level = |use_regex: bool| -> PreTokenizerWrapper {
            ByteLevel::new(false, true, use_regex).into()
        };
        let split = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| {
                TokenizerError::InvalidSpec(format!("pre-tokenizer regex does not compile: {e}"))
            })
        };
        Ok(match self {
            Self::Gpt2 => byte_level(true),
            Self::IndividualDigits => {
                PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
            }
            Self::Llama3 => {
                PreTokenizerSequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into()
            }
            Self::Qwen2 => {
                PreTokenizerSequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]).into()
            }
        })
    }

    /// llama.cpp's `ignore_merges`: a pre-token that is itself in the vocabulary is taken whole.
    fn ignore_merges(self) -> bool {
        matches!(self, Self::Llama3)
    }
}

/// Build the `tokenizers` pipeline equivalent to the GGUF's tokenizer.
pub fn build_tokenizer(spec: &GgufTokenizerSpec) -> Result<tokenizers::Tokenizer, TokenizerError> {
    if spec.tokens.is_empty() {
        return Err(TokenizerError::InvalidSpec(
            "tokenizer.ggml.tokens is empty".to_string(),
        ));
    }
    if !spec.token_types.is_empty() && spec.token_types.len() != spec.tokens.len() {
        return Err(TokenizerError::InvalidSpec(format!(
            "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
            spec.token_types.len(),
            spec.tokens.len()
        )));
    }
    if !spec.scores.is_empty() && spec.scores.len() != spec.tokens.len() {
        return Err(TokenizerError::InvalidSpec(format!(
            "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {}",
            spec.scores.len(),
            spec.tokens.len()
        )));
    }
    let mut tokenizer = match spec.model.as_str() {
        "gpt2" => build_gpt2(spec)?,
        "llama" => build_llama(spec)?,
        other => {
            return Err(TokenizerError::InvalidSpec(format!(
                "unsupported tokenizer.ggml.model {other:?} (supported: \"gpt2\", \"llama\")"
            )))
        }
    };
    add_special_tokens(&mut tokenizer, spec);
    if let Some(post) = post_processor(spec)? {
        tokenizer.with_post_processor(Some(post));
    }
    Ok(tokenizer)
}

fn vocab_of(spec: &GgufTokenizerSpec) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, tok) in spec.tokens.iter().enumerate() {
        if vocab.contains_key(tok) {
            tracing::warn!(
                token = tok.as_str(),
                id,
                "duplicate token in tokenizer.ggml.tokens; keeping the first id"
            );
            continue;
        }
        vocab.insert(tok.clone(), id as u32);
    }
    vocab
}

fn build_gpt2(spec: &GgufTokenizerSpec) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let kind = PreTokenizerKind::from_pre(spec.pre.as_deref());
    let mut merges: Merges = Vec::with_capacity(spec.merges.len());
    for (i, m) in spec.merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            TokenizerError::InvalidSpec(format!(
                "tokenizer.ggml.merges[{i}] = {m:?} is not of the form \"a b\""
            ))
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(spec), merges)
        .ignore_merges(kind.ignore_merges())
        .build()
        .map_err(|e| TokenizerError::InvalidSpec(format!("cannot build byte-level BPE: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(kind.pre_tokenizer()?));
    tokenizer.with_decoder(Some(DecoderWrapper::from(ByteLevel::default())));
    Ok(tokenizer)
}

/// SentencePiece merges in the order `transformers`' `SentencePieceExtractor` produces them:
/// every split of a piece into two vocabulary pieces, grouped per piece (ordered by the ids of
/// the two halves), then stably sorted by the merged piece's score, best first. Without scores
/// the piece id is the rank (lower id first). Only normal and user-defined pieces are merge
/// results; control, unknown, unused and byte tokens are never formed by merging.
pub fn spm_merges(spec: &GgufTokenizerSpec, vocab: &Vocab) -> Merges {
    let mut merges: Vec<(String, String, f64)> = Vec::new();
    for (id, piece) in spec.tokens.iter().enumerate() {
        let ty = spec.token_type(id);
        if ty != token_type::NORMAL && ty != token_type::USER_DEFINED {
            continue;
        }
        if vocab.get(piece) != Some(&(id as u32)) {
            continue; // a duplicate of an earlier piece
        }
        let rank = match spec.scores.get(id) {
            Some(s) => -(*s as f64),
            None => id as f64,
        };
        let mut local: Vec<(u32, u32, &str, &str)> = Vec::new();
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (l.to_string(), r.to_string(), rank)),
        );
    }
    merges.sort_by(|a, b| a.2.total_cmp(&b.2));
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

fn build_llama(spec: &GgufTokenizerSpec) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab = vocab_of(spec);
    let merges = spm_merges(spec, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some((unk, _)) = spec.token_text(spec.unknown_token_id, "unknown")? {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| TokenizerError::InvalidSpec(format!("cannot build SentencePiece BPE: {e}")))?;
    let add_space_prefix = spec.add_space_prefix.unwrap_or(true);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| {
            TokenizerError::InvalidSpec(format!("cannot build replace {from:?} -> {to:?}: {e}"))
        })
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".to_string()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Control and unknown tokens become special added tokens, user-defined ones non-special added
/// tokens; all are matched verbatim in the raw text (not normalized), as llama.cpp does.
fn add_special_tokens(tokenizer: &mut tokenizers::Tokenizer, spec: &GgufTokenizerSpec) {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (id, tok) in spec.tokens.iter().enumerate() {
        if tok.is_empty() {
            continue;
        }
        match spec.token_type(id) {
            token_type::CONTROL | token_type::UNKNOWN => {
                special.push(AddedToken::from(tok.clone(), true).normalized(false))
            }
            token_type::USER_DEFINED => {
                user.push(AddedToken::from(tok.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    // Also treat the declared BOS/EOS/UNK/PAD tokens as special even if the GGUF typed them
    // as normal (some converters do).
    for id in [
        spec.bos_token_id,
        spec.eos_token_id,
        spec.unknown_token_id,
        spec.padding_token_id,
    ]
    .into_iter()
    .flatten()
    {
        if let Some(tok) = spec.tokens.get(id as usize) {
            if spec.token_type(id as usize) == token_type::NORMAL && !tok.is_empty() {
                special.push(AddedToken::from(tok.clone(), true).normalized(false));
            }
        }
    }
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user);
}

fn post_processor(spec: &GgufTokenizerSpec) -> Result<Option<TemplateProcessing>, TokenizerError> {
    let bos = if spec.effective_add_bos() {
        spec.token_text(spec.bos_token_id, "BOS")?
    } else {
        None
    };
    let eos = if spec.effective_add_eos() {
        spec.token_text(spec.eos_token_id, "EOS")?
    } else {
        None
    };
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    // Template pieces name special tokens by key; the keys "BOS"/"EOS" map to the real ids, so
    // token texts containing ':' or spaces cannot confuse the template parser.
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some((text, id)) = &bos {
        single.push("BOS".to_string());
        pair.push("BOS".to_string());
        specials.push(
            SpecialToken::new("BOS".into(), vec![*id], vec![text.clone()]).map_err(|e| {
                TokenizerError::InvalidSpec(format!("cannot build BOS template token: {e}"))
            })?,
        );
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let Some((text, id)) = &eos {
        single.push("EOS".to_string());
        pair.push("EOS".to_string());
        specials.push(
            SpecialToken::new("EOS".into(), vec![*id], vec![text.clone()]).map_err(|e| {
                TokenizerError::InvalidSpec(format!("cannot build EOS template token: {e}"))
            })?,
        );
    }
    if bos.is_some() {
        pair.push("BOS:1".to_string());
    }
    pair.push("$B:1".to_string());
    if eos.is_some() {
        pair.push("EOS:1".to_string());
    }
    let processor = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| TokenizerError::InvalidSpec(format!("bad BOS/EOS template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| TokenizerError::InvalidSpec(format!("bad BOS/EOS template: {e}")))?;
    Ok(Some(processor))
}
