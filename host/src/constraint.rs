//! Constrained decoding: a request's output held to a JSON schema, any JSON object, a regular
//! expression, a list of choices or a Lark grammar, compiled by llguidance. The model's
//! vocabulary is indexed once (`ConstraintEngine`, a byte trie over every token with special tokens
//! kept out of text); each sample of a constrained request owns a `Constraint`, which records
//! every token the sequence takes (`commit`, free) and, when asked, advances past them and computes
//! the tokens allowed next (`prepare`, the costly part: backends call it for all their rows at
//! once, in parallel, and the GPU backend while the forward runs). The end-of-sequence token is allowed only where the
//! grammar may end, and is the only token allowed once it must. `mask_words` gives the mask as
//! the device sampler reads it.
//!
//! A constraint plugin (`ConstraintSpec::Plugin`) works through the same `Constraint`: its
//! allowed tokens are set by the engine before each step from the plugin's answer (`set_allowed`),
//! so every sampling path (host, device fallback, sampler plugins) masks them the same way.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The model's tokenizer cannot be indexed (an unknown decoder type).
    #[error("constrained decoding is not available for this tokenizer: {0}")]
    Tokenizer(String),
    /// The schema, expression or grammar does not compile.
    #[error("{0}")]
    Grammar(String),
}

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema.
    JsonSchema(serde_json::Value),
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect, which also takes GBNF-like `::=` rules).
    Grammar(String),
    /// A constraint plugin by name, with the request's configuration (JSON text, "" for none).
    Plugin { name: String, config: String },
}

/// Whitespace allowed between JSON tokens: enough for any indentation a model writes, but bounded,
/// so that a model cannot fill its whole output with blanks inside a valid document.
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,24}";

/// `schema` with the JSON compiler's options (llguidance's `x-guidance`) unless it brings its own.
pub(crate) fn with_json_options(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

impl ConstraintSpec {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            ConstraintSpec::JsonObject => TopLevelGrammar::from_json_schema(with_json_options(serde_json::json!({"type": "object"}))),
            ConstraintSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_json_options(schema.clone())),
            ConstraintSpec::Regex(regex) => TopLevelGrammar::from_regex(regex),
            ConstraintSpec::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            ConstraintSpec::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
            ConstraintSpec::Plugin { .. } => unreachable!("plugin constraints are not compiled"),
        }
    }
}

/// The model's tokenizer as llguidance sees it: its tokens as bytes, and its own tokenization
/// of text (for the literals of a grammar).
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// A grammar's forced bytes may begin or end inside a multi-byte character (a literal is
    /// forced a token at a time): whole characters go through the tokenizer, the pieces of one
    /// byte by byte through the trie. (Through `from_utf8_lossy` a piece became U+FFFD, and the
    /// output carried that character instead of the literal's.)
    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        let mut tokens = Vec::new();
        for chunk in bytes.utf8_chunks() {
            if !chunk.valid().is_empty() {
                match self.tokenizer.encode(chunk.valid(), false) {
                    Ok(ids) => tokens.extend(ids),
                    Err(_) => tokens.extend(self.trie.greedy_tokenize(chunk.valid().as_bytes())),
                }
            }
            tokens.extend(self.trie.greedy_tokenize(chunk.invalid()));
        }
        tokens
    }
}

/// The bytes each token id of `tokenizer` stands for, as llguidance reads them from the tokenizer's
/// JSON (special tokens come out as their text).
fn raw_token_bytes(tokenizer: &Tokenizer) -> Result<Vec<Vec<u8>>, ConstraintError> {
    let text = tokenizer.inner().to_string(false).map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
    llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| ConstraintError::Tokenizer(e.to_string()))
}

/// The bytes each token id stands for, special tokens empty: what constraint plugins see of the
/// vocabulary (`host.vocabulary`).
pub fn token_bytes(tokenizer: &Tokenizer) -> Result<Vec<Vec<u8>>, ConstraintError> {
    let mut words = raw_token_bytes(tokenizer)?;
    for (id, word) in words.iter_mut().enumerate() {
        if tokenizer.is_special_token_id(id as u32) {
            word.clear();
        }
    }
    Ok(words)
}

/// A model's vocabulary indexed for constrained decoding (built once, shared by every request).
pub struct ConstraintEngine {
    factory: ParserFactory,
    eos: u32,
}

impl ConstraintEngine {
    /// Indexes `tokenizer`'s vocabulary, `vocab_size` ids wide (the model's, which may pad the
    /// tokenizer's), with `eos` the token that ends a constrained output.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos: u32) -> Result<Self, ConstraintError> {
        let mut words = raw_token_bytes(&tokenizer)?;
        // Ids past the tokenizer's (padding of the embedding) can never be text.
        words.resize(vocab_size.max(words.len()), Vec::new());
        for (id, word) in words.iter_mut().enumerate() {
            if word.is_empty() || tokenizer.is_special_token_id(id as u32) && word[0] != TokTrie::SPECIAL_TOKEN_MARKER {
                let name = tokenizer.id_to_token(id as u32).unwrap_or_else(|| format!("<[{id}]>"));
                *word = [&[TokTrie::SPECIAL_TOKEN_MARKER][..], name.as_bytes()].concat();
            }
        }
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(TokenizerBytes { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(ConstraintEngine { factory, eos })
    }

    /// A fresh constraint for one output; a schema or grammar that does not compile is an error
    /// here, before the request is admitted.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        if let ConstraintSpec::Plugin { name, config } = spec {
            return Ok(Constraint::plugin(name, config, self.eos));
        }
        let parser = self.factory.create_parser(spec.grammar()).map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        let allowed = matcher.compute_mask_or_eos().map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        Ok(Constraint {
            spec: Arc::new(spec.clone()),
            matcher: Some(matcher),
            allowed: Some(allowed),
            pending: false,
            taken: Vec::new(),
            failed: None,
            eos: self.eos,
        })
    }
}

/// One output's constraint (clone it for each of `n` samples: each advances on its own).
#[derive(Clone)]
pub struct Constraint {
    spec: Arc<ConstraintSpec>,
    /// The grammar's state; `None` for a plugin constraint.
    matcher: Option<Matcher>,
    /// The tokens allowed next; `None` after a failure (then only `eos` is), and for a plugin
    /// constraint after each token until the engine sets the next mask.
    allowed: Option<SimpleVob>,
    /// A grammar constraint that took a token and has not computed what may follow (`prepare`).
    pending: bool,
    /// Tokens taken (`commit`) that the grammar has not consumed yet: `prepare` consumes them
    /// with the mask, in the backend's parallel pass, not one row after another at commit.
    taken: Vec<u32>,
    failed: Option<String>,
    /// The token that ends the output.
    eos: u32,
}

impl Constraint {
    /// A constraint whose allowed tokens constraint plugin `name` gives, step by step.
    pub fn plugin(name: &str, config: &str, eos: u32) -> Self {
        let spec = ConstraintSpec::Plugin { name: name.to_string(), config: config.to_string() };
        Constraint { spec: Arc::new(spec), matcher: None, allowed: None, pending: false, taken: Vec::new(), failed: None, eos }
    }

    pub fn spec(&self) -> &ConstraintSpec {
        &self.spec
    }

    /// The token that ends the output.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The constraint plugin that says what may come next, if this is a plugin constraint.
    pub fn plugin_name(&self) -> Option<&str> {
        match &*self.spec {
            ConstraintSpec::Plugin { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether the engine must set this step's allowed tokens (`set_allowed`) before sampling.
    pub fn needs_mask(&self) -> bool {
        self.matcher.is_none() && self.allowed.is_none() && self.failed.is_none()
    }

    /// Sets the tokens allowed next (a plugin constraint's answer, already validated).
    pub fn set_allowed(&mut self, allowed: SimpleVob) {
        self.allowed = Some(allowed);
    }

    /// Whether `token` may come next.
    pub fn allows(&self, token: u32) -> bool {
        match &self.allowed {
            Some(allowed) => allowed.is_allowed(token),
            None => false,
        }
    }

    /// The mask as `ceil(vocab / 32)` words, bit `i % 32` of word `i / 32` allowing token `i`
    /// (the device sampler's layout, which is also `SimpleVob`'s). After a failure, only `eos`.
    pub fn mask_words(&self, vocab: usize) -> Vec<u32> {
        let mut out = vec![0u32; vocab.div_ceil(32)];
        self.write_mask_words(vocab, &mut out);
        out
    }

    /// `mask_words` into `out` (`ceil(vocab / 32)` words), in place, so that a step's masks go
    /// straight into its upload.
    pub fn write_mask_words(&self, vocab: usize, out: &mut [u32]) {
        debug_assert!(!self.pending, "prepare() before sampling");
        debug_assert_eq!(out.len(), vocab.div_ceil(32));
        match &self.allowed {
            Some(allowed) => {
                let from = allowed.as_slice();
                let n = from.len().min(out.len());
                out[..n].copy_from_slice(&from[..n]);
                out[n..].fill(0);
                // Ids past the vocabulary in the last word stay clear.
                if vocab % 32 != 0 && n == out.len() {
                    out[n - 1] &= (1u32 << (vocab % 32)) - 1;
                }
            }
            None => {
                out.fill(0);
                if (self.eos as usize) < vocab {
                    out[self.eos as usize / 32] |= 1 << (self.eos % 32);
                }
            }
        }
    }

    /// Advances the grammar past the tokens taken since the last call and computes the tokens
    /// allowed next (a grammar's mask: microseconds to a few milliseconds); a no-op when nothing
    /// was taken.
    pub fn prepare(&mut self) {
        if !self.pending {
            return;
        }
        self.pending = false;
        if !self.consume_taken() {
            return;
        }
        let Some(matcher) = &mut self.matcher else { return };
        match matcher.compute_mask_or_eos() {
            Ok(allowed) => self.allowed = Some(allowed),
            Err(e) => {
                self.failed = Some(e.to_string());
                self.allowed = None;
            }
        }
    }

    /// Feeds the grammar the tokens `commit` recorded; false if one was not allowed (then the
    /// constraint has failed and allows only `eos`).
    fn consume_taken(&mut self) -> bool {
        let Some(matcher) = &mut self.matcher else { return true };
        let failed = self.taken.drain(..).find_map(|token| matcher.consume_token(token).err());
        match failed {
            Some(e) => {
                self.failed = Some(e.to_string());
                self.allowed = None;
                false
            }
            None => true,
        }
    }

    /// Whether `prepare` has work to do.
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// Sets every logit of a token that may not come next to -inf (a row of the vocabulary;
    /// ids past the mask are never allowed). After a failure, nothing but `eos` survives.
    pub fn mask_logits(&self, logits: &mut [f32]) {
        debug_assert!(!self.pending, "prepare() before sampling");
        let eos = self.eos;
        match &self.allowed {
            Some(allowed) => {
                for (id, logit) in logits.iter_mut().enumerate() {
                    if !allowed.is_allowed(id as u32) {
                        *logit = f32::NEG_INFINITY;
                    }
                }
            }
            None => {
                for (id, logit) in logits.iter_mut().enumerate() {
                    if id as u32 != eos {
                        *logit = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// Records that the output took `token`; the grammar advances past it, and computes what may
    /// follow, in `prepare` (which the backends run for all rows in parallel, while the GPU
    /// forward runs: llguidance's `consume_token` costs a few microseconds a row).
    pub fn commit(&mut self, token: u32) {
        if self.failed.is_some() {
            return;
        }
        self.allowed = None;
        if self.matcher.is_none() {
            // A plugin constraint: the next mask comes from the plugin.
            return;
        }
        self.taken.push(token);
        self.pending = true;
    }

    /// Why the constraint stopped following the output, if it did (a token it did not allow
    /// was taken, e.g. by a sampler plugin); known once `prepare` has run after that token.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Whether the output so far is complete under the grammar.
    pub fn is_accepting(&mut self) -> bool {
        if !self.consume_taken() {
            return false;
        }
        self.matcher.as_mut().is_some_and(|m| m.is_accepting().unwrap_or(false))
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("spec", &self.spec).field("failed", &self.failed).finish()
    }
}

impl PartialEq for Constraint {
    /// Same specification (the state is the output's, not the request's).
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

/// A constraint engine over a fixture tokenizer and a made-up decoder, for tests here and in
/// modules that build constraints.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn engine() -> (ConstraintEngine, Arc<Tokenizer>) {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch/llama");
        let tokenizer = Arc::new(Tokenizer::from_hf_dir(&dir).unwrap());
        let eos = tokenizer.eos_token_id().unwrap();
        (ConstraintEngine::new(tokenizer.clone(), tokenizer.vocab_size() + 16, eos).unwrap(), tokenizer)
    }

    /// Greedy decoding of a made-up "model" that wants to write `target` (then end), and
    /// otherwise prefers low token ids: the constraint alone decides where it may not.
    pub(crate) fn decode(constraint: &mut Constraint, tokenizer: &Tokenizer, target: &str) -> String {
        let eos = tokenizer.eos_token_id().unwrap();
        let wanted = tokenizer.encode(target, false).unwrap();
        let mut out = Vec::new();
        for step in 0..400 {
            let mut logits: Vec<f32> = (0..tokenizer.vocab_size() + 16).map(|id| -(id as f32) * 1e-6).collect();
            logits[*wanted.get(step).unwrap_or(&eos) as usize] = 100.0;
            constraint.prepare();
            constraint.mask_logits(&mut logits);
            let token = crate::sampling::argmax(&logits) as u32;
            assert!(logits[token as usize].is_finite(), "something is always allowed");
            if token == eos {
                break;
            }
            out.push(token);
            constraint.commit(token);
        }
        tokenizer.decode(&out, false).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{decode, engine};
    use super::*;

    #[test]
    fn outputs_follow_regexes_choices_and_schemas() {
        let (engine, tokenizer) = engine();
        let compile = |spec: ConstraintSpec| engine.compile(&spec).unwrap();
        let digits = ConstraintSpec::Regex("[0-9]{3}".into());
        assert_eq!(decode(&mut compile(digits.clone()), &tokenizer, "123"), "123", "what fits goes through");
        let forced = decode(&mut compile(digits), &tokenizer, "hello");
        assert!(forced.len() == 3 && forced.chars().all(|c| c.is_ascii_digit()), "what does not is held to the regex: {forced:?}");
        let answer = decode(&mut compile(ConstraintSpec::Choice(vec!["yes".into(), "no".into()])), &tokenizer, "maybe");
        assert!(answer == "yes" || answer == "no", "{answer:?}");
        let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false});
        let text = decode(&mut compile(ConstraintSpec::JsonSchema(schema)), &tokenizer, r#"{"n": 12345}"#);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(value["n"], 12345, "{text}");
        // The model's own layout (spaces, a newline) is kept where JSON allows it.
        let text = decode(&mut compile(ConstraintSpec::JsonObject), &tokenizer, "{\n  \"a\": [1, 2]\n}");
        assert_eq!(text, "{\n  \"a\": [1, 2]\n}");
    }

    #[test]
    fn end_of_sequence_only_where_the_grammar_may_end() {
        let (engine, tokenizer) = engine();
        let eos = tokenizer.eos_token_id().unwrap();
        let mut c = engine.compile(&ConstraintSpec::Regex("ab".into())).unwrap();
        assert!(!c.allows(eos));
        for t in tokenizer.encode("ab", false).unwrap() {
            c.commit(t);
            assert!(c.is_pending());
            c.prepare();
        }
        assert!(c.allows(eos) && c.is_accepting());
        let words = c.mask_words(tokenizer.vocab_size());
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 1, "only the end is left");
        assert_eq!(words[eos as usize / 32] >> (eos % 32) & 1, 1);
        // A token the constraint did not allow: it stops following, and only `eos` is left.
        let mut c = engine.compile(&ConstraintSpec::Regex("ab".into())).unwrap();
        c.commit(tokenizer.encode("zz", false).unwrap()[0]);
        c.prepare();
        assert!(c.failure().is_some());
        let mut logits = vec![1.0f32; tokenizer.vocab_size()];
        c.mask_logits(&mut logits);
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
        assert!(logits[eos as usize].is_finite());
    }

    #[test]
    fn grammars_that_do_not_compile_are_errors() {
        let (engine, _) = engine();
        assert!(engine.compile(&ConstraintSpec::Regex("(".into())).is_err());
        assert!(engine.compile(&ConstraintSpec::Grammar("start: missing_rule".into())).is_err());
        assert!(engine.compile(&ConstraintSpec::JsonSchema(serde_json::json!({"type": "nonsense"}))).is_err());
        assert!(engine.compile(&ConstraintSpec::Grammar("start: \"a\" | \"b\"".into())).is_ok());
    }
}

