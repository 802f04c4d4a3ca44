//! Sampling parameters as the engine sees them (already parsed from the API), with the range
//! checks that make a request valid. Error messages name the API field.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 (or a value >= vocabulary size) means no limit.
    pub top_k: usize,
    /// In (0, 1]; 1 means no nucleus cut.
    pub top_p: f32,
    /// In [0, 1]; 0 means off.
    pub min_p: f32,
    /// In [-2, 2]: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// In [-2, 2]: subtracted per occurrence from the logit of every token already generated.
    pub frequency_penalty: f32,
    /// Greater than 0; 1 means off. Tokens in the prompt or output have positive logits divided by it and
    /// > negative ones multiplied (CTRL / transformers semantics).
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    /// Added to the logits of the given token ids.
    pub logit_bias: BTreeMap<u32, f32>,
    /// How many alternatives to report with each token's log-prob (`None`: no log-probs).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logit_bias: BTreeMap::new(),
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` {message}")]
pub struct SamplingParamsError {
    pub field: &'static str,
    pub message: String,
}

/// Most alternatives a request may ask for (OpenAI allows 20 for chat, 5 for completions).
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingParamsError> {
        let err = |field, message: String| Err(SamplingParamsError { field, message });
        if !(0.0..=2.0).contains(&self.temperature) {
            return err("temperature", format!("must be in [0, 2], got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return err("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return err("presence_penalty", format!("must be in [-2, 2], got {}", self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return err("frequency_penalty", format!("must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return err("repetition_penalty", format!("must be in (0, 10], got {}", self.repetition_penalty));
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return err("logprobs", format!("must be at most {MAX_LOGPROBS}, got {n}"));
            }
        }
        for (&token, &bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return err("logit_bias", format!("token id {token} is outside the vocabulary of {vocab_size}"));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return err("logit_bias", format!("bias of token {token} must be in [-100, 100], got {bias}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let bad = SamplingParams { top_p: 1.5, ..Default::default() };
        assert_eq!(bad.validate(10).unwrap_err().to_string(), "`top_p` must be in (0, 1], got 1.5");
        let bad = SamplingParams { logit_bias: [(10, 1.0)].into(), ..Default::default() };
        assert!(bad.validate(10).unwrap_err().to_string().starts_with("`logit_bias`"));
        assert!(SamplingParams::default().validate(10).is_ok());
        assert!(SamplingParams { temperature: 0.0, ..Default::default() }.is_greedy());
    }
}
