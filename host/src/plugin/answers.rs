//! The checks every plugin answer passes before the engine or the HTTP layer acts on it: a
//! scheduler's ranking, a sampler's outputs, a filter's verdicts and a constraint's token masks.
//! Each is a pure function from the answer as the component returned it (the WIT types, exported
//! here as `wit`) to the host's type, or a message that makes the call an `invalid_output` fault.
//! They are public so that the fuzz targets (`tests/fuzz`) drive the same code the slots call.

use llguidance::toktrie::SimpleVob;

pub use super::bindings::types as wit;
use super::filter::{FilterParams, FilterVerdict, OutputVerdict};
use super::sampler::PluginSampled;
use crate::sched::SeqId;

/// Longest rejection message or stop reason a filter may answer, in bytes.
pub const MAX_FILTER_MESSAGE: usize = 1024;
/// Longest tenant or sampler name a filter may set, in bytes.
pub const MAX_FILTER_NAME: usize = 256;

/// A scheduler's ranking of the view's `ids`: it must be a permutation of `0..ids.len()`.
pub fn ranking(ids: &[SeqId], ranking: &[u32]) -> Result<Vec<SeqId>, String> {
    if ranking.len() != ids.len() {
        return Err(format!("ranked {} indices for {} sequences", ranking.len(), ids.len()));
    }
    let mut seen = vec![false; ids.len()];
    ranking
        .iter()
        .map(|&index| {
            let slot = seen.get_mut(index as usize).ok_or_else(|| format!("index {index} is outside the view of {}", ids.len()))?;
            if std::mem::replace(slot, true) {
                return Err(format!("index {index} ranked twice"));
            }
            Ok(ids[index as usize])
        })
        .collect()
}

/// A sampler's outputs for `inputs` sequences: one each, tokens inside the vocabulary, log-probs
/// that are probabilities' logs (not NaN, not above 0).
pub fn samples(outputs: Vec<wit::SampleOutput>, inputs: usize, vocab_size: usize) -> Result<Vec<PluginSampled>, String> {
    if outputs.len() != inputs {
        return Err(format!("answered {} tokens for {inputs} sequences", outputs.len()));
    }
    outputs
        .into_iter()
        .map(|o| {
            if o.token as usize >= vocab_size {
                return Err(format!("token {} is outside the vocabulary of {vocab_size}", o.token));
            }
            if o.logprob.is_some_and(|l| l.is_nan() || l > 0.0) {
                return Err(format!("log-prob {:?} is not <= 0", o.logprob));
            }
            Ok(PluginSampled { token: o.token, logprob: o.logprob })
        })
        .collect()
}

/// Parameters a filter rewrote: they must still be a request the server would accept.
fn filter_params(p: wit::RequestParams) -> Result<FilterParams, String> {
    if p.max_tokens == 0 {
        return Err("modified max-tokens is 0".into());
    }
    if !(0.0..=2.0).contains(&p.temperature) {
        return Err(format!("modified temperature {} is outside [0, 2]", p.temperature));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(format!("modified top-p {} is outside (0, 1]", p.top_p));
    }
    if p.tenant.len() > MAX_FILTER_NAME || p.sampler.as_ref().is_some_and(|s| s.len() > MAX_FILTER_NAME) {
        return Err(format!("modified tenant or sampler is longer than {MAX_FILTER_NAME} bytes"));
    }
    Ok(FilterParams {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: p.seed,
        priority: p.priority,
        tenant: p.tenant,
        sampler: p.sampler,
    })
}

/// A filter's verdict on a request: a rejection carries an error status and a bounded message; a
/// modification, acceptable parameters.
pub fn request_verdict(verdict: wit::RequestVerdict) -> Result<FilterVerdict, String> {
    match verdict {
        wit::RequestVerdict::Continue => Ok(FilterVerdict::Continue),
        wit::RequestVerdict::Reject(r) => {
            if !(400..=599).contains(&r.status) {
                return Err(format!("rejected with status {}, not an error status", r.status));
            }
            if r.message.len() > MAX_FILTER_MESSAGE {
                return Err(format!("rejection message of {} bytes (limit {MAX_FILTER_MESSAGE})", r.message.len()));
            }
            Ok(FilterVerdict::Reject { status: r.status, message: r.message })
        }
        wit::RequestVerdict::Modify(params) => filter_params(params).map(FilterVerdict::Modify),
    }
}

/// A filter's verdict on output so far: a stop reason is bounded.
pub fn output_verdict(verdict: wit::OutputVerdict) -> Result<OutputVerdict, String> {
    match verdict {
        wit::OutputVerdict::Continue => Ok(OutputVerdict::Continue),
        wit::OutputVerdict::Stop(reason) if reason.len() > MAX_FILTER_MESSAGE => {
            Err(format!("stop reason of {} bytes (limit {MAX_FILTER_MESSAGE})", reason.len()))
        }
        wit::OutputVerdict::Stop(reason) => Ok(OutputVerdict::Stop(reason)),
    }
}

/// A constraint's mask for one step, spread over `mask_width` ids (`vocab` of them may be
/// allowed; the rest pad the model's embedding). It must allow at least one token, all inside
/// the vocabulary.
pub fn token_mask(mask: wit::TokenMask, vocab: u32, mask_width: usize) -> Result<SimpleVob, String> {
    if vocab == 0 {
        return Err("the vocabulary is empty".into());
    }
    let mut vob = SimpleVob::alloc(mask_width.max(vocab as usize));
    match mask {
        wit::TokenMask::All => vob.allow_range(0..=vocab - 1),
        wit::TokenMask::Ranges(ranges) => {
            for (start, end) in ranges {
                if start >= end || end > vocab {
                    return Err(format!("range [{start}, {end}) is empty or outside the vocabulary of {vocab}"));
                }
                vob.allow_range(start..=end - 1);
            }
        }
        wit::TokenMask::Bits(words) => {
            if words.len() > (vocab as usize).div_ceil(32) {
                return Err(format!("a bitset of {} words is longer than the vocabulary of {vocab}", words.len()));
            }
            for (index, &word) in words.iter().enumerate() {
                let mut rest = word;
                while rest != 0 {
                    let token = index as u32 * 32 + rest.trailing_zeros();
                    if token >= vocab {
                        return Err(format!("token {token} is outside the vocabulary of {vocab}"));
                    }
                    vob.allow_token(token);
                    rest &= rest - 1;
                }
            }
        }
    }
    if vob.is_zero() {
        return Err("the mask allows no token".into());
    }
    Ok(vob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rankings_must_be_permutations_of_the_indices() {
        let ids = [30, 10, 20];
        assert_eq!(ranking(&ids, &[1, 2, 0]), Ok(vec![10, 20, 30]));
        assert!(ranking(&ids, &[1, 2]).unwrap_err().contains("ranked 2 indices for 3"));
        assert!(ranking(&ids, &[1, 1, 0]).unwrap_err().contains("ranked twice"));
        assert!(ranking(&ids, &[0, 1, 3]).unwrap_err().contains("outside the view"));
        assert!(ranking(&ids, &[0, 1, 2, 2]).is_err());
        assert_eq!(ranking(&[], &[]), Ok(vec![]));
    }

    #[test]
    fn sampled_tokens_and_logprobs_are_checked() {
        let out = |token, logprob| wit::SampleOutput { token, logprob };
        assert_eq!(samples(vec![out(3, Some(-0.5)), out(0, None)], 2, 4).unwrap().len(), 2);
        assert!(samples(vec![out(3, None)], 2, 4).unwrap_err().contains("1 tokens for 2"));
        assert!(samples(vec![out(4, None)], 1, 4).unwrap_err().contains("outside the vocabulary"));
        for bad in [f32::NAN, 0.1, f32::INFINITY] {
            assert!(samples(vec![out(1, Some(bad))], 1, 4).is_err(), "{bad}");
        }
        assert!(samples(vec![out(1, Some(f32::NEG_INFINITY))], 1, 4).is_ok(), "a log of 0 is -inf");
    }

    #[test]
    fn filter_verdicts_are_checked() {
        let params = |max_tokens, temperature, top_p: f32, tenant: &str| wit::RequestParams {
            max_tokens,
            temperature,
            top_p,
            top_k: 0,
            seed: None,
            priority: 0,
            tenant: tenant.into(),
            sampler: None,
        };
        assert!(request_verdict(wit::RequestVerdict::Modify(params(8, 1.0, 1.0, "a"))).is_ok());
        for bad in [params(0, 1.0, 1.0, ""), params(8, 2.5, 1.0, ""), params(8, f32::NAN, 1.0, ""), params(8, 1.0, 0.0, ""), params(8, 1.0, f32::NAN, ""), params(8, 1.0, 1.0, &"t".repeat(257))] {
            assert!(request_verdict(wit::RequestVerdict::Modify(bad.clone())).is_err(), "{bad:?}");
        }
        let reject = |status, message: &str| wit::RequestVerdict::Reject(wit::Rejection { status, message: message.into() });
        assert_eq!(request_verdict(reject(429, "slow down")), Ok(FilterVerdict::Reject { status: 429, message: "slow down".into() }));
        assert!(request_verdict(reject(200, "")).is_err());
        assert!(request_verdict(reject(400, &"x".repeat(1025))).is_err());
        assert!(output_verdict(wit::OutputVerdict::Stop("x".repeat(1025))).is_err());
        assert_eq!(output_verdict(wit::OutputVerdict::Stop("enough".into())), Ok(OutputVerdict::Stop("enough".into())));
    }

    #[test]
    fn masks_are_checked_and_spread_over_the_row() {
        let vob = token_mask(wit::TokenMask::Ranges(vec![(1, 3), (7, 8)]), 10, 16).unwrap();
        assert_eq!(vob.to_list(), vec![1, 2, 7]);
        assert_eq!(vob.len(), 16, "as wide as the logits row");
        let vob = token_mask(wit::TokenMask::Bits(vec![0b1001]), 10, 16).unwrap();
        assert_eq!(vob.to_list(), vec![0, 3]);
        assert_eq!(token_mask(wit::TokenMask::All, 10, 16).unwrap().to_list(), (0..10).collect::<Vec<u32>>(), "padding ids stay out");
        for bad in [
            wit::TokenMask::Ranges(vec![]),
            wit::TokenMask::Ranges(vec![(3, 3)]),
            wit::TokenMask::Ranges(vec![(5, 11)]),
            wit::TokenMask::Bits(vec![0]),
            wit::TokenMask::Bits(vec![1 << 10]),
            wit::TokenMask::Bits(vec![1, 1]),
        ] {
            assert!(token_mask(bad.clone(), 10, 16).is_err(), "{bad:?}");
        }
        assert!(token_mask(wit::TokenMask::All, 0, 16).is_err(), "an empty vocabulary allows nothing");
    }
}
