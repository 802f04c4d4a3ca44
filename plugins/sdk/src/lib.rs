//! The guest SDK for pagedserve plugins: the WIT bindings of the four worlds of
//! `pagedserve:plugins@0.2.0` (`scheduler`, `sampler`, `filter`, `constraint`) generated once
//! here, and small helpers, so that a plugin is a short crate:
//!
//! ```ignore
//! use pagedserve_plugin_sdk::scheduler::{export_scheduler, rank_by, Budget, Guest, QueueView};
//! struct Fcfs;
//! impl Guest for Fcfs {
//!     fn configure(_: String) -> Result<(), String> { Ok(()) }
//!     fn rank(queue: QueueView, _: Budget) -> Result<Vec<u32>, String> {
//!         Ok(rank_by(&queue, |s| (s.arrival, s.id)))
//!     }
//! }
//! export_scheduler!(Fcfs);
//! ```
//!
//! Every plugin built with this SDK is a 0.2.0 component (the host still loads 0.1.0 ones, which
//! are built against `wit/0.1.0` directly: see `plugins/compat/`).
//!
//! Sandbox rules a plugin lives by (the host links no WASI capability; any WASI function the Rust
//! standard library happens to import traps when called):
//! - no randomness: use `BTreeMap`, not `std::collections::HashMap` with its random seed (or
//!   `HashMap` with a fixed hasher); seed generators from request data (`sampler::SplitMix64`).
//!   Dependencies too: one whose `std` feature keys maps with `std`'s seeded hasher makes the
//!   component import `wasi:random/insecure-seed`, which traps (`constraints/regex` builds
//!   `regex-automata` with `alloc` for that reason);
//! - no clock but `host::now`, no files, no environment, no printing: log through `log`;
//! - state in `static`s lives while the instance is healthy; after any fault the host starts a
//!   fresh instance (and calls `configure` again), so state is a cache, never a source of truth.
//!
//! Plugin logic is written as plain functions over the binding types so that it is unit-tested
//! natively (`cargo test` in `plugins/`); calling a host import natively panics (a constraint's
//! tests give their vocabulary as a `&[Vec<u8>]` rather than calling `constraint::vocabulary`).

#![forbid(unsafe_code)]

/// The `scheduler` world: `configure` and `rank`.
pub mod scheduler {
    wit_bindgen::generate!({
        world: "scheduler",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_scheduler",
        default_bindings_module: "pagedserve_plugin_sdk::scheduler",
        // The shared `types` are generated here (the other worlds reuse them through `with`), so
        // this is where they get `PartialEq`: tests compare masks and outputs whole.
        additional_derives: [PartialEq],
    });

    /// One sequence of a `QueueView`, read row-wise: what a plugin's ranking logic works with.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Seq<'a> {
        /// Its position in the view: what `rank` answers with.
        pub index: u32,
        pub id: u64,
        pub priority: i32,
        pub tenant: &'a str,
        pub arrival: u64,
        pub prompt_tokens: u32,
        pub computed_tokens: u32,
        pub generated_tokens: u32,
        pub max_tokens: u32,
        pub blocks_held: u32,
        pub running: bool,
    }

    impl QueueView {
        pub fn len(&self) -> usize {
            self.ids.len()
        }

        pub fn is_empty(&self) -> bool {
            self.ids.is_empty()
        }

        /// Sequence `i` (panics when `i` is out of range, like indexing; a tenant index out of
        /// range, never sent by the host, reads as "").
        pub fn seq(&self, i: usize) -> Seq<'_> {
            Seq {
                index: i as u32,
                id: self.ids[i],
                priority: self.priorities[i],
                tenant: self.tenant_names.get(self.tenants[i] as usize).map_or("", String::as_str),
                arrival: self.arrivals[i],
                prompt_tokens: self.prompt_tokens[i],
                computed_tokens: self.computed_tokens[i],
                generated_tokens: self.generated_tokens[i],
                max_tokens: self.max_tokens[i],
                blocks_held: self.blocks_held[i],
                running: self.running[i],
            }
        }

        /// Every sequence in view order. Built by zipping the columns rather than indexing them,
        /// so no bounds check can panic and the compiler drops the columns a ranking never reads
        /// (a ranking by arrival touches two of the eleven). A tenant index out of range (never
        /// sent by the host) reads as "".
        pub fn iter(&self) -> impl Iterator<Item = Seq<'_>> + '_ {
            let numbers = self.ids.iter().zip(&self.priorities).zip(&self.tenants).zip(&self.arrivals);
            let tokens = self.prompt_tokens.iter().zip(&self.computed_tokens).zip(&self.generated_tokens).zip(&self.max_tokens);
            let rest = self.blocks_held.iter().zip(&self.running);
            numbers.zip(tokens).zip(rest).enumerate().map(
                |(index, (((((&id, &priority), &tenant), &arrival), (((&prompt, &computed), &generated), &max)), (&blocks, &running)))| Seq {
                    index: index as u32,
                    id,
                    priority,
                    tenant: self.tenant_names.get(tenant as usize).map_or("", String::as_str),
                    arrival,
                    prompt_tokens: prompt,
                    computed_tokens: computed,
                    generated_tokens: generated,
                    max_tokens: max,
                    blocks_held: blocks,
                    running,
                },
            )
        }

        /// Checks that every column has one entry per sequence and every tenant index is in
        /// range (the host always sends such views; a plugin's tests may build others).
        pub fn is_consistent(&self) -> bool {
            let n = self.ids.len();
            [
                self.priorities.len(),
                self.tenants.len(),
                self.arrivals.len(),
                self.prompt_tokens.len(),
                self.computed_tokens.len(),
                self.generated_tokens.len(),
                self.max_tokens.len(),
                self.blocks_held.len(),
                self.running.len(),
            ]
            .iter()
            .all(|&len| len == n)
                && self.tenants.iter().all(|&t| (t as usize) < self.tenant_names.len())
        }

        /// The view of these sequences, columns filled and tenants collected into the name table
        /// (their `index` fields are ignored: a sequence's index is its position in `seqs`).
        pub fn from_seqs(seqs: &[Seq<'_>]) -> QueueView {
            let mut view = QueueView {
                ids: Vec::new(),
                priorities: Vec::new(),
                tenants: Vec::new(),
                tenant_names: Vec::new(),
                arrivals: Vec::new(),
                prompt_tokens: Vec::new(),
                computed_tokens: Vec::new(),
                generated_tokens: Vec::new(),
                max_tokens: Vec::new(),
                blocks_held: Vec::new(),
                running: Vec::new(),
            };
            for s in seqs {
                let tenant = match view.tenant_names.iter().position(|t| t == s.tenant) {
                    Some(i) => i,
                    None => {
                        view.tenant_names.push(s.tenant.to_string());
                        view.tenant_names.len() - 1
                    }
                };
                view.ids.push(s.id);
                view.priorities.push(s.priority);
                view.tenants.push(tenant as u32);
                view.arrivals.push(s.arrival);
                view.prompt_tokens.push(s.prompt_tokens);
                view.computed_tokens.push(s.computed_tokens);
                view.generated_tokens.push(s.generated_tokens);
                view.max_tokens.push(s.max_tokens);
                view.blocks_held.push(s.blocks_held);
                view.running.push(s.running);
            }
            view
        }

        /// The ids of a ranking given as indices (for readable assertions in tests).
        pub fn ids_of(&self, ranking: &[u32]) -> Vec<u64> {
            ranking.iter().map(|&i| self.ids[i as usize]).collect()
        }
    }

    /// A waiting sequence with the given id and arrival and small defaults (4 prompt tokens, at
    /// most 8 new, priority 0, no tenant): the starting point of a plugin's tests, which then
    /// set the fields they care about with struct-update syntax and build a view with
    /// `QueueView::from_seqs`.
    pub fn seq(id: u64, arrival: u64) -> Seq<'static> {
        Seq {
            index: 0,
            id,
            priority: 0,
            tenant: "",
            arrival,
            prompt_tokens: 4,
            computed_tokens: 0,
            generated_tokens: 0,
            max_tokens: 8,
            blocks_held: 0,
            running: false,
        }
    }

    /// Indices of the view sorted by `key` (ties keep view order): the usual body of a ranking.
    pub fn rank_by<K: Ord>(queue: &QueueView, mut key: impl FnMut(Seq<'_>) -> K) -> Vec<u32> {
        let mut keyed: Vec<(K, u32)> = queue.iter().map(|s| (key(s), s.index)).collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, i)| i).collect()
    }
}

/// The `sampler` world: `configure`, `top-n` and `sample`.
pub mod sampler {
    wit_bindgen::generate!({
        world: "sampler",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_sampler",
        default_bindings_module: "pagedserve_plugin_sdk::sampler",
        with: {
            "pagedserve:plugins/types@0.2.0": crate::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host@0.2.0": crate::scheduler::pagedserve::plugins::host,
        },
    });

    /// A small deterministic generator (SplitMix64): seed it from the request's seed and the
    /// sequence's position so that a seeded request draws the same tokens in any batch.
    #[derive(Debug, Clone)]
    pub struct SplitMix64(pub u64);

    impl SplitMix64 {
        /// A generator for draw number `step` of a request seeded with `seed`.
        pub fn for_step(seed: u64, step: u32) -> Self {
            SplitMix64(seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        pub fn next_f64(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Softmax of `logits / temperature`, in float64 (temperature <= 0 is treated as 1).
    pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
        let t = if temperature > 0.0 { temperature as f64 } else { 1.0 };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exps: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / t).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / sum).collect()
    }

    /// Draws an index from the (not necessarily normalised) weights with a uniform `u` in [0, 1).
    pub fn draw(weights: &[f64], u: f64) -> usize {
        let total: f64 = weights.iter().sum();
        let mut target = u * total;
        for (i, &w) in weights.iter().enumerate() {
            if target < w {
                return i;
            }
            target -= w;
        }
        weights.len().saturating_sub(1)
    }
}

/// The `filter` world: `configure`, `on-request` and `on-output`.
pub mod filter {
    wit_bindgen::generate!({
        world: "filter",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_filter",
        default_bindings_module: "pagedserve_plugin_sdk::filter",
        with: {
            "pagedserve:plugins/types@0.2.0": crate::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host@0.2.0": crate::scheduler::pagedserve::plugins::host,
        },
    });
    pub use crate::scheduler::pagedserve::plugins::types::{Rejection, RequestParams};

    /// The value of header `name` (lower case), if the request has it.
    pub fn header<'a>(req: &'a RequestInfo, name: &str) -> Option<&'a str> {
        req.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The bearer token of the `authorization` header, if any.
    pub fn bearer_token(req: &RequestInfo) -> Option<&str> {
        let value = header(req, "authorization")?;
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    pub fn reject(status: u16, message: impl Into<String>) -> RequestVerdict {
        RequestVerdict::Reject(Rejection { status, message: message.into() })
    }
}

/// The `constraint` world: `configure`, `start`, `next` and `end`; the tokens a request's output
/// may continue with, as a `TokenMask` per sequence and step.
pub mod constraint {
    wit_bindgen::generate!({
        world: "constraint",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_constraint",
        default_bindings_module: "pagedserve_plugin_sdk::constraint",
        with: {
            "pagedserve:plugins/types@0.2.0": crate::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host@0.2.0": crate::scheduler::pagedserve::plugins::host,
        },
    });

    use std::sync::OnceLock;

    static VOCABULARY: OnceLock<Vec<Vec<u8>>> = OnceLock::new();

    /// The bytes of each token id (special tokens: empty), indexed by id. Asked of the host once
    /// per instance and kept: the list is large (tens of thousands of tokens) and never changes.
    /// An empty answer (a host that does not know the model's tokenizer yet) is not kept: the
    /// next call asks again. Calling it in `configure`, which has the longest deadline, takes the
    /// copy out of the first `start`'s.
    pub fn vocabulary() -> &'static [Vec<u8>] {
        if let Some(vocab) = VOCABULARY.get() {
            return vocab;
        }
        let vocab = crate::scheduler::pagedserve::plugins::host::vocabulary();
        if vocab.is_empty() {
            return &[];
        }
        VOCABULARY.get_or_init(|| vocab)
    }

    /// Makes `vocabulary()` answer `vocab` instead of asking the host, which native code cannot
    /// call. Only the first vocabulary counts (given here or fetched); answers whether it was this
    /// one. Logic that is tested with several vocabularies takes a `&[Vec<u8>]` instead.
    pub fn provide_vocabulary(vocab: Vec<Vec<u8>>) -> bool {
        VOCABULARY.set(vocab).is_ok()
    }

    /// The bytes of `token`: empty for special tokens and for ids the vocabulary lacks (a model
    /// may have more ids than its tokenizer names).
    pub fn token_bytes(vocab: &[Vec<u8>], token: u32) -> &[u8] {
        vocab.get(token as usize).map_or(&[], Vec::as_slice)
    }

    /// A `TokenMask::Bits` allowing the tokens below `vocab_size` for which `allowed` holds.
    pub fn mask_where(vocab_size: u32, allowed: impl Fn(u32) -> bool) -> TokenMask {
        let mut words = vec![0u32; vocab_size.div_ceil(32) as usize];
        for token in 0..vocab_size {
            if allowed(token) {
                words[(token / 32) as usize] |= 1 << (token % 32);
            }
        }
        TokenMask::Bits(words)
    }

    /// Masks by a key that sums up what they depend on (a sequence's automaton state, words
    /// left, ...), so that sequences in the same situation share one; bounded: cleared when full
    /// (in practice few states recur, and a miss only costs recomputing).
    #[derive(Debug)]
    pub struct MaskCache<K> {
        masks: std::collections::BTreeMap<K, TokenMask>,
        capacity: usize,
    }

    /// A cache of `MaskCache::DEFAULT_CAPACITY` masks.
    impl<K: Ord> Default for MaskCache<K> {
        fn default() -> Self {
            MaskCache::new(Self::DEFAULT_CAPACITY)
        }
    }

    impl<K: Ord> MaskCache<K> {
        /// 256 masks: 1.5 MiB for a 49k vocabulary.
        pub const DEFAULT_CAPACITY: usize = 256;

        pub fn new(capacity: usize) -> Self {
            MaskCache { masks: std::collections::BTreeMap::new(), capacity: capacity.max(1) }
        }

        /// The mask for `key`, computed by `make` on a miss.
        pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> TokenMask) -> TokenMask {
            if let Some(mask) = self.masks.get(&key) {
                return mask.clone();
            }
            let mask = make();
            if self.masks.len() >= self.capacity {
                self.masks.clear();
            }
            self.masks.insert(key, mask.clone());
            mask
        }

        pub fn len(&self) -> usize {
            self.masks.len()
        }

        pub fn is_empty(&self) -> bool {
            self.masks.is_empty()
        }
    }

    /// A `TokenMask::Ranges` allowing exactly `tokens` (in any order, repeats allowed), adjacent
    /// ids merged into one range. No tokens gives an empty mask, which the host takes as a fault.
    pub fn only(tokens: &[u32]) -> TokenMask {
        let mut sorted = tokens.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for token in sorted {
            match ranges.last_mut() {
                Some((_, end)) if *end == token => *end += 1,
                _ => ranges.push((token, token.saturating_add(1))),
            }
        }
        TokenMask::Ranges(ranges)
    }

    impl TokenMask {
        /// Whether the mask allows `token` (regardless of the vocabulary's size).
        pub fn allows(&self, token: u32) -> bool {
            match self {
                TokenMask::All => true,
                TokenMask::Ranges(ranges) => ranges.iter().any(|&(start, end)| (start..end).contains(&token)),
                TokenMask::Bits(words) => {
                    words.get((token / 32) as usize).is_some_and(|w| w & (1 << (token % 32)) != 0)
                }
            }
        }

        /// The tokens below `vocab_size` the mask allows, in order (for tests and logs).
        pub fn allowed(&self, vocab_size: u32) -> Vec<u32> {
            (0..vocab_size).filter(|&t| self.allows(t)).collect()
        }

        /// Checks the mask as the host does: not empty, nothing at or past `vocab_size`, no
        /// empty or reversed range, no more words than the vocabulary needs.
        pub fn validate(&self, vocab_size: u32) -> Result<(), String> {
            match self {
                TokenMask::All => Ok(()),
                TokenMask::Ranges(ranges) => {
                    if let Some(&(start, end)) = ranges.iter().find(|&&(s, e)| s >= e || e > vocab_size) {
                        return Err(format!("range [{start}, {end}) is empty or outside the vocabulary of {vocab_size}"));
                    }
                    if ranges.is_empty() {
                        return Err("no token allowed".into());
                    }
                    Ok(())
                }
                TokenMask::Bits(words) => {
                    let needed = vocab_size.div_ceil(32) as usize;
                    if words.len() > needed {
                        return Err(format!("{} words for a vocabulary of {vocab_size} (at most {needed})", words.len()));
                    }
                    let past_end = |last: u32| !vocab_size.is_multiple_of(32) && last >> (vocab_size % 32) != 0;
                    if words.len() == needed && past_end(words[needed - 1]) {
                        return Err(format!("bits set at or past the vocabulary's size {vocab_size}"));
                    }
                    if words.iter().all(|&w| w == 0) {
                        return Err("no token allowed".into());
                    }
                    Ok(())
                }
            }
        }
    }

    /// The tokens a sequence took since the plugin last looked at it, oldest first, for a plugin
    /// that has consumed the first `consumed` generated tokens already (0 after `start`). Usually
    /// one; an error when they are no longer all among `recent-tokens` (which keeps 64), or when
    /// `consumed` is ahead of the sequence: state kept per sequence cannot be brought up to date.
    pub fn new_tokens(step: &ConstraintStep, consumed: u32) -> Result<&[u32], String> {
        let missing = step.generated_tokens.checked_sub(consumed).ok_or_else(|| {
            format!("sequence {}: {} tokens generated, fewer than the {consumed} seen", step.id, step.generated_tokens)
        })? as usize;
        let recent = &step.recent_tokens;
        if missing > recent.len() {
            return Err(format!(
                "sequence {}: {missing} tokens generated since the last step, only the last {} are known",
                step.id,
                recent.len()
            ));
        }
        Ok(&recent[recent.len() - missing..])
    }
}

pub use scheduler::pagedserve::plugins::types::LogLevel;

/// Logging and time through the host interface (the only imports a plugin has; the vocabulary,
/// for constraints, is `constraint::vocabulary`, which keeps it).
pub mod host {
    pub use crate::scheduler::pagedserve::plugins::host::{config, log, now};
    use crate::LogLevel;

    pub fn info(message: &str) {
        log(LogLevel::Info, message)
    }

    pub fn warn(message: &str) {
        log(LogLevel::Warn, message)
    }
}

/// Parses a JSON configuration; the empty string means `T::default()`.
pub fn parse_config<T: serde::de::DeserializeOwned + Default>(config: &str) -> Result<T, String> {
    if config.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(config).map_err(|e| format!("invalid configuration: {e}"))
}

pub use serde;
pub use serde_json;

#[cfg(test)]
mod tests {
    use crate::scheduler::{rank_by, seq, QueueView, Seq};

    #[test]
    fn a_queue_view_reads_back_the_sequences_it_was_built_from() {
        let seqs = [
            Seq { tenant: "a", priority: 3, running: true, ..seq(10, 5) },
            Seq { tenant: "b", ..seq(11, 6) },
            Seq { tenant: "a", max_tokens: 99, ..seq(12, 7) },
        ];
        let queue = QueueView::from_seqs(&seqs);
        assert!(queue.is_consistent());
        assert_eq!(queue.tenant_names, vec!["a", "b"]);
        assert_eq!(queue.tenants, vec![0, 1, 0]);
        let read: Vec<Seq> = queue.iter().collect();
        for (i, (got, want)) in read.iter().zip(&seqs).enumerate() {
            assert_eq!(*got, Seq { index: i as u32, ..*want });
            assert_eq!(queue.seq(i), *got);
        }
    }

    #[test]
    fn rank_by_sorts_indices_by_key_and_breaks_ties_by_position() {
        let queue = QueueView::from_seqs(&[seq(7, 2), seq(8, 1), seq(9, 2), seq(6, 0)]);
        let ranking = rank_by(&queue, |s| s.arrival);
        assert_eq!(ranking, vec![3, 1, 0, 2]);
        assert_eq!(queue.ids_of(&ranking), vec![6, 8, 7, 9]);
    }

    #[test]
    fn inconsistent_views_are_detected() {
        let mut queue = QueueView::from_seqs(&[seq(1, 0), seq(2, 1)]);
        queue.arrivals.pop();
        assert!(!queue.is_consistent());
        let mut queue = QueueView::from_seqs(&[seq(1, 0)]);
        queue.tenants[0] = 5;
        assert!(!queue.is_consistent());
        assert_eq!(queue.seq(0).tenant, "", "an out-of-range tenant reads as none");
        assert_eq!(queue.iter().next().unwrap().tenant, "");
    }

    #[test]
    fn mask_where_sets_bit_i_mod_32_of_word_i_div_32_and_nothing_past_the_vocabulary() {
        use crate::constraint::{mask_where, TokenMask};
        let mask = mask_where(70, |t| t % 3 == 0 || t == 69);
        let TokenMask::Bits(words) = &mask else { panic!("{mask:?}") };
        assert_eq!(words.len(), 3, "70 tokens need 3 words");
        assert_eq!(words[0], (0..32).filter(|t| t % 3 == 0).fold(0, |w, t| w | 1 << t));
        assert_eq!(words[2], 1 << 2 | 1 << 5, "tokens 66 and 69 are bits 2 and 5 of word 2");
        assert_eq!(mask.allowed(70), (0..70).filter(|t| t % 3 == 0 || *t == 69).collect::<Vec<_>>());
        assert!(mask.validate(70).is_ok());
        // Every token allowed by the predicate, even past the vocabulary, still sets no bit there.
        let all = mask_where(33, |_| true);
        assert_eq!(all, TokenMask::Bits(vec![u32::MAX, 1]));
        assert!(all.validate(33).is_ok());
        assert_eq!(mask_where(64, |t| t == 63), TokenMask::Bits(vec![0, 1 << 31]));
    }

    #[test]
    fn only_merges_adjacent_tokens_into_ranges() {
        use crate::constraint::{only, TokenMask};
        assert_eq!(only(&[7, 3, 4, 5, 9, 4, 8]), TokenMask::Ranges(vec![(3, 6), (7, 10)]));
        assert_eq!(only(&[2]), TokenMask::Ranges(vec![(2, 3)]));
        assert_eq!(only(&[2]).allowed(10), vec![2]);
        assert!(only(&[]).validate(10).is_err(), "nothing allowed is a fault");
        assert!(only(&[10]).validate(10).is_err(), "a token past the vocabulary is a fault");
        assert!(only(&[9]).validate(10).is_ok());
    }

    #[test]
    fn validate_refuses_what_the_host_refuses() {
        use crate::constraint::TokenMask;
        assert!(TokenMask::All.validate(1).is_ok());
        assert!(TokenMask::Bits(vec![0, 0]).validate(64).is_err());
        assert!(TokenMask::Bits(vec![1, 0, 0]).validate(64).is_err(), "too many words");
        assert!(TokenMask::Bits(vec![1 << 5]).validate(5).is_err(), "bit 5 of a 5-token vocabulary");
        assert!(TokenMask::Bits(vec![1 << 4]).validate(5).is_ok());
        assert!(TokenMask::Ranges(vec![(4, 2)]).validate(10).is_err());
        assert!(TokenMask::Ranges(vec![(3, 3)]).validate(10).is_err());
        assert!(TokenMask::Ranges(vec![(3, 3), (4, 5)]).validate(10).is_err(), "any empty range is a fault");
        assert!(TokenMask::Ranges(vec![]).validate(10).is_err());
    }

    #[test]
    fn new_tokens_are_the_tail_of_the_recent_tokens() {
        use crate::constraint::{new_tokens, ConstraintStep};
        let step =
            |recent: Vec<u32>, generated| ConstraintStep { id: 4, recent_tokens: recent, generated_tokens: generated };
        // Prompt 10 11, then 20 21 22 generated; the plugin has seen 20 already.
        let s = step(vec![10, 11, 20, 21, 22], 3);
        assert_eq!(new_tokens(&s, 1).unwrap(), &[21, 22]);
        assert_eq!(new_tokens(&s, 3).unwrap(), &[] as &[u32]);
        assert_eq!(new_tokens(&step(vec![10, 11], 0), 0).unwrap(), &[] as &[u32]);
        let lost = new_tokens(&step((0..64).collect(), 70), 2).unwrap_err();
        assert!(lost.contains("68 tokens"), "{lost}");
        assert!(new_tokens(&s, 4).is_err(), "seen more than generated");
    }

    #[test]
    fn a_provided_vocabulary_is_answered_without_asking_the_host() {
        use crate::constraint::{provide_vocabulary, vocabulary};
        // The only test of this binary that touches the instance-wide vocabulary.
        assert!(provide_vocabulary(vec![b"a".to_vec(), Vec::new()]));
        assert_eq!(vocabulary(), &[b"a".to_vec(), Vec::new()]);
        assert!(!provide_vocabulary(vec![b"b".to_vec()]), "the first one stays");
        assert_eq!(vocabulary().len(), 2);
    }

    #[test]
    fn token_bytes_are_empty_past_the_vocabulary() {
        use crate::constraint::token_bytes;
        let vocab = vec![b"a".to_vec(), Vec::new()];
        assert_eq!(token_bytes(&vocab, 0), b"a");
        assert_eq!(token_bytes(&vocab, 1), b"");
        assert_eq!(token_bytes(&vocab, 9), b"");
    }
}
