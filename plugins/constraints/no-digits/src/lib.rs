//! No digits: the output never contains an ASCII digit. Every token whose bytes contain one of
//! `0`-`9` is forbidden; every other token (EOS and the other special tokens included) is allowed.
//!
//! Configuration: none, neither the operator's nor the request's (`""` or `{}`; anything else
//! fails `configure` or `start`, so that a request that meant to configure something hears so).
//!
//! The mask depends on the vocabulary alone: it is computed once (per vocabulary size and EOS
//! token) and answered for every sequence at every step.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pagedserve_plugin_sdk::constraint::{
    self, export_constraint, MaskCache, mask_where, token_bytes, ConstraintRequest, ConstraintStep, Guest, TokenMask,
};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
struct NoConfig {}

fn no_config(config: &str) -> Result<(), String> {
    pagedserve_plugin_sdk::parse_config::<NoConfig>(config)
        .map(|_| ())
        .map_err(|e| format!("the no-digits constraint takes no configuration: {e}"))
}

/// The tokens allowed at every step: those without an ASCII digit, and EOS whatever its bytes.
pub fn mask(vocab: &[Vec<u8>], vocab_size: u32, eos: u32) -> TokenMask {
    mask_where(vocab_size, |token| token == eos || !token_bytes(vocab, token).iter().any(u8::is_ascii_digit))
}

/// The live sequences (each with its vocabulary size and EOS token) and the masks computed.
#[derive(Debug, Default)]
pub struct NoDigits {
    seqs: BTreeMap<u64, (u32, u32)>,
    /// By (vocab-size, eos): one in practice.
    masks: MaskCache<(u32, u32)>,
}

impl NoDigits {
    pub fn start(&mut self, req: &ConstraintRequest) -> Result<(), String> {
        no_config(&req.config)?;
        self.seqs.insert(req.id, (req.vocab_size, req.eos_token));
        Ok(())
    }

    pub fn next(&mut self, step: &ConstraintStep, vocab: &[Vec<u8>]) -> Result<TokenMask, String> {
        let &(vocab_size, eos) = self.seqs.get(&step.id).ok_or_else(|| format!("sequence {} was not started", step.id))?;
        Ok(self.masks.get_or_insert_with((vocab_size, eos), || mask(vocab, vocab_size, eos)))
    }

    pub fn end(&mut self, ids: &[u64]) {
        for id in ids {
            self.seqs.remove(id);
        }
    }
}

static STATE: Mutex<Option<NoDigits>> = Mutex::new(None);

struct Plugin;

impl Guest for Plugin {
    fn configure(config: String) -> Result<(), String> {
        no_config(&config)?;
        // The vocabulary's copy now, under the setup deadline, rather than in the first step's.
        constraint::vocabulary();
        Ok(())
    }

    fn start(req: ConstraintRequest) -> Result<(), String> {
        STATE.lock().unwrap().get_or_insert_with(NoDigits::default).start(&req)
    }

    fn next(steps: Vec<ConstraintStep>) -> Result<Vec<TokenMask>, String> {
        let mut state = STATE.lock().unwrap();
        let state = state.get_or_insert_with(NoDigits::default);
        let vocab = constraint::vocabulary();
        steps.iter().map(|step| state.next(step, vocab)).collect()
    }

    fn end(ids: Vec<u64>) {
        if let Some(state) = STATE.lock().unwrap().as_mut() {
            state.end(&ids);
        }
    }
}

export_constraint!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    /// 0 "a", 1 "b7", 2 "42", 3 " x", 4 EOS, 5 "\u{0663}" (an Arabic-Indic three: not ASCII),
    /// 6 "9", 7 another special, and ids 8 and 9 past the tokenizer's list.
    fn vocab() -> Vec<Vec<u8>> {
        ["a", "b7", "42", " x", "", "\u{0663}", "9", ""].iter().map(|t| t.as_bytes().to_vec()).collect()
    }

    fn request(id: u64, config: &str) -> ConstraintRequest {
        ConstraintRequest { id, prompt_tokens: vec![2, 6], config: config.into(), vocab_size: 10, eos_token: 4 }
    }

    #[test]
    fn tokens_with_an_ascii_digit_are_forbidden_and_the_rest_allowed() {
        let m = mask(&vocab(), 10, 4);
        assert!(m.validate(10).is_ok());
        assert_eq!(m.allowed(10), vec![0, 3, 4, 5, 7, 8, 9]);
        // EOS stays allowed even if the vocabulary spelled it with a digit.
        let mut odd = vocab();
        odd[4] = b"</s0>".to_vec();
        assert!(mask(&odd, 10, 4).allows(4));
    }

    #[test]
    fn every_sequence_gets_the_same_mask_at_every_step() {
        let vocab = vocab();
        let mut p = NoDigits::default();
        p.start(&request(1, "")).unwrap();
        p.start(&request(2, "{}")).unwrap();
        let step = |id, generated| ConstraintStep { id, recent_tokens: vec![2, 6, 0, 3], generated_tokens: generated };
        let first = p.next(&step(1, 0), &vocab).unwrap();
        assert_eq!(first, mask(&vocab, 10, 4));
        assert_eq!(p.next(&step(2, 2), &vocab).unwrap(), first);
        assert_eq!(p.masks.len(), 1, "computed once");
        p.end(&[1]);
        assert!(p.next(&step(1, 1), &vocab).is_err());
        assert_eq!(p.next(&step(2, 3), &vocab).unwrap(), first);
    }

    #[test]
    fn a_request_configuration_is_refused() {
        let e = NoDigits::default().start(&request(1, r#"{"except": "7"}"#)).unwrap_err();
        assert!(e.contains("takes no configuration"), "{e}");
    }
}
