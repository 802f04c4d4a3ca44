//! Every check on a plugin's answer (`pagedserve::plugin::answers`), fed answers built from
//! arbitrary bytes, and what an accepted answer must then guarantee: a ranking is a permutation,
//! sampled tokens are inside the vocabulary with log-probs <= 0, a rejection has an error status
//! and a bounded message, rewritten parameters are in range, a mask allows only vocabulary ids.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use pagedserve::plugin::answers::{self, wit, MAX_FILTER_MESSAGE, MAX_FILTER_NAME};
use pagedserve::plugin::{FilterVerdict, OutputVerdict};

fn string(u: &mut Unstructured) -> arbitrary::Result<String> {
    // Mostly short; now and then past the limits.
    let len = match u.int_in_range(0..=9u8)? {
        0 => u.int_in_range(MAX_FILTER_NAME - 2..=MAX_FILTER_MESSAGE + 2)?,
        _ => u.int_in_range(0..=8)?,
    };
    Ok("x".repeat(len))
}

fn float(u: &mut Unstructured) -> arbitrary::Result<f32> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => u.int_in_range(-4..=4i8)? as f32 * 0.5,
        _ => f32::from_bits(u32::arbitrary(u)?),
    })
}

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    match u.int_in_range(0..=4u8)? {
        0 => {
            let ids: Vec<u64> = Vec::arbitrary(u)?;
            // A shuffled permutation, then perhaps one index changed, dropped or added.
            let mut ranking: Vec<u32> = (0..ids.len() as u32).collect();
            for i in (1..ranking.len()).rev() {
                let j = u.int_in_range(0..=i)?;
                ranking.swap(i, j);
            }
            match u.int_in_range(0..=3u8)? {
                0 if !ranking.is_empty() => {
                    let at = u.choose_index(ranking.len())?;
                    ranking[at] = u32::arbitrary(u)?;
                }
                1 => drop(ranking.pop()),
                2 => ranking.push(u32::arbitrary(u)?),
                _ => {}
            }
            if let Ok(order) = answers::ranking(&ids, &ranking) {
                let (mut a, mut b) = (order.clone(), ids.clone());
                a.sort_unstable();
                b.sort_unstable();
                assert_eq!(a, b, "an accepted ranking is a permutation");
            }
        }
        1 => {
            let inputs = u.int_in_range(0..=8usize)?;
            let vocab = u.int_in_range(0..=64usize)?;
            let n = u.int_in_range(0..=9usize)?;
            let outputs = (0..n)
                .map(|_| Ok(wit::SampleOutput { token: u.int_in_range(0..=70)?, logprob: if bool::arbitrary(u)? { Some(float(u)?) } else { None } }))
                .collect::<arbitrary::Result<Vec<_>>>()?;
            if let Ok(sampled) = answers::samples(outputs, inputs, vocab) {
                assert_eq!(sampled.len(), inputs);
                for s in sampled {
                    assert!((s.token as usize) < vocab);
                    assert!(s.logprob.is_none_or(|l| l <= 0.0));
                }
            }
        }
        2 => {
            let verdict = match u.int_in_range(0..=2u8)? {
                0 => wit::RequestVerdict::Continue,
                1 => wit::RequestVerdict::Reject(wit::Rejection { status: u16::arbitrary(u)?, message: string(u)? }),
                _ => wit::RequestVerdict::Modify(wit::RequestParams {
                    max_tokens: u.int_in_range(0..=3)?,
                    temperature: float(u)?,
                    top_p: float(u)?,
                    top_k: u32::arbitrary(u)?,
                    seed: Option::arbitrary(u)?,
                    priority: i32::arbitrary(u)?,
                    tenant: string(u)?,
                    sampler: if bool::arbitrary(u)? { Some(string(u)?) } else { None },
                }),
            };
            match answers::request_verdict(verdict) {
                Ok(FilterVerdict::Reject { status, message }) => {
                    assert!((400..=599).contains(&status));
                    assert!(message.len() <= MAX_FILTER_MESSAGE);
                }
                Ok(FilterVerdict::Modify(p)) => {
                    assert!(p.max_tokens > 0 && (0.0..=2.0).contains(&p.temperature) && p.top_p > 0.0 && p.top_p <= 1.0, "{p:?}");
                    assert!(p.tenant.len() <= MAX_FILTER_NAME && p.sampler.is_none_or(|s| s.len() <= MAX_FILTER_NAME));
                }
                Ok(FilterVerdict::Continue) | Err(_) => {}
            }
            let stop = if bool::arbitrary(u)? { wit::OutputVerdict::Stop(string(u)?) } else { wit::OutputVerdict::Continue };
            if let Ok(OutputVerdict::Stop(reason)) = answers::output_verdict(stop) {
                assert!(reason.len() <= MAX_FILTER_MESSAGE);
            }
        }
        _ => {
            let vocab: u32 = u.int_in_range(0..=300)?;
            let width = u.int_in_range(0..=320usize)?;
            let mask = match u.int_in_range(0..=2u8)? {
                0 => wit::TokenMask::All,
                1 => wit::TokenMask::Ranges(
                    (0..u.int_in_range(0..=6)?).map(|_| Ok((u.int_in_range(0..=310)?, u.int_in_range(0..=310)?))).collect::<arbitrary::Result<_>>()?,
                ),
                _ => wit::TokenMask::Bits(Vec::arbitrary(u)?),
            };
            if let Ok(vob) = answers::token_mask(mask, vocab, width) {
                assert!(vob.len() >= width.max(vocab as usize));
                let allowed = vob.to_list();
                assert!(!allowed.is_empty(), "an accepted mask allows a token");
                assert!(allowed.iter().all(|&t| t < vocab), "{allowed:?} outside {vocab}");
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
