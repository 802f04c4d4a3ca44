//! A hostile constraint for the host's containment tests; each request's configuration,
//! `{"mode": "..."}`, names how it misbehaves for that request's sequences:
//! `empty` (an empty mask: no range), `out-of-vocab` (a range at `vocab-size`), `wrong-count`
//! (one mask fewer than steps), `loop` (never returns from `next`), `trap` (panics in `next`),
//! `start-error` (`start` returns an error), `oom` (allocates 8 MiB blocks without end in `next`).
//! Any other mode, no configuration or one that does not parse: it behaves, allowing every token.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;

use pagedserve_plugin_sdk::constraint::{export_constraint, ConstraintRequest, ConstraintStep, Guest, TokenMask};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", default)]
struct Config {
    mode: String,
}

/// The mode a request's configuration names ("" when it names none).
pub fn mode(config: &str) -> String {
    pagedserve_plugin_sdk::serde_json::from_str::<Config>(config).map(|c| c.mode).unwrap_or_default()
}

/// Each started sequence's mode and vocabulary size.
static SEQS: Mutex<BTreeMap<u64, (String, u32)>> = Mutex::new(BTreeMap::new());

/// Reserves 8 MiB blocks without end: each grows the linear memory, so the memory limit (not
/// the deadline, as filling them would) is what stops it.
pub fn allocate_forever() -> usize {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(black_box(Vec::<u8>::with_capacity(8 << 20)));
        black_box(&hoard);
    }
}

struct Hostile;

impl Guest for Hostile {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn start(req: ConstraintRequest) -> Result<(), String> {
        let mode = mode(&req.config);
        if mode == "start-error" {
            return Err("hostile constraint refuses to start".into());
        }
        SEQS.lock().unwrap().insert(req.id, (mode, req.vocab_size));
        Ok(())
    }

    fn next(steps: Vec<ConstraintStep>) -> Result<Vec<TokenMask>, String> {
        let seqs = SEQS.lock().unwrap();
        let mut masks = Vec::with_capacity(steps.len());
        let mut one_fewer = false;
        for step in &steps {
            let (mode, vocab_size) = seqs.get(&step.id).map_or(("", 0), |(m, v)| (m.as_str(), *v));
            masks.push(match mode {
                "empty" => TokenMask::Ranges(Vec::new()),
                "out-of-vocab" => TokenMask::Ranges(vec![(vocab_size, vocab_size.saturating_add(1))]),
                "wrong-count" => {
                    one_fewer = true;
                    TokenMask::All
                }
                "loop" => loop {
                    black_box(&masks);
                },
                "trap" => panic!("hostile constraint traps"),
                "oom" => {
                    allocate_forever();
                    TokenMask::All
                }
                _ => TokenMask::All,
            });
        }
        if one_fewer {
            masks.pop();
        }
        Ok(masks)
    }

    fn end(ids: Vec<u64>) {
        let mut seqs = SEQS.lock().unwrap();
        for id in ids {
            seqs.remove(&id);
        }
    }
}

export_constraint!(Hostile);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_comes_from_the_request_configuration() {
        assert_eq!(mode(r#"{"mode": "empty"}"#), "empty");
        assert_eq!(mode(r#"{"mode": "oom", "extra": 1}"#), "oom");
        assert_eq!(mode(""), "");
        assert_eq!(mode("not json"), "");
        assert_eq!(mode("{}"), "");
    }

    #[test]
    fn each_sequence_misbehaves_as_its_request_asks() {
        let req = |id, config: &str| ConstraintRequest {
            id,
            prompt_tokens: vec![1],
            config: config.into(),
            vocab_size: 100,
            eos_token: 2,
        };
        let step = |id| ConstraintStep { id, recent_tokens: vec![1], generated_tokens: 0 };
        assert!(Hostile::start(req(90, r#"{"mode": "start-error"}"#)).is_err());
        Hostile::start(req(91, r#"{"mode": "empty"}"#)).unwrap();
        Hostile::start(req(92, r#"{"mode": "out-of-vocab"}"#)).unwrap();
        Hostile::start(req(93, "")).unwrap();
        let masks = Hostile::next(vec![step(91), step(92), step(93)]).unwrap();
        assert_eq!(masks, vec![TokenMask::Ranges(vec![]), TokenMask::Ranges(vec![(100, 101)]), TokenMask::All]);
        assert!(masks[0].validate(100).is_err() && masks[1].validate(100).is_err() && masks[2].validate(100).is_ok());
        Hostile::start(req(94, r#"{"mode": "wrong-count"}"#)).unwrap();
        assert_eq!(Hostile::next(vec![step(93), step(94)]).unwrap().len(), 1);
        Hostile::end(vec![91, 92, 93, 94]);
    }
}
