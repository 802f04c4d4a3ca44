//! The guest SDK for pagedserve plugins: the WIT bindings of the three worlds (`scheduler`,
//! `sampler`, `filter`) generated once here, and small helpers, so that a plugin is a short crate:
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
//! Sandbox rules a plugin lives by (the host links no WASI capability; any WASI function the Rust
//! standard library happens to import traps when called):
//! - no randomness: use `BTreeMap`, not `std::collections::HashMap` with its random seed (or
//!   `HashMap` with a fixed hasher); seed generators from request data (`sampler::SplitMix64`);
//! - no clock but `host::now`, no files, no environment, no printing: log through `log`;
//! - state in `static`s lives while the instance is healthy; after any fault the host starts a
//!   fresh instance (and calls `configure` again), so state is a cache, never a source of truth.
//!
//! Plugin logic is written as plain functions over the binding types so that it is unit-tested
//! natively (`cargo test` in `plugins/`); calling a host import natively panics.

#![forbid(unsafe_code)]

/// The `scheduler` world: `configure` and `rank`.
pub mod scheduler {
    wit_bindgen::generate!({
        world: "scheduler",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_scheduler",
        default_bindings_module: "pagedserve_plugin_sdk::scheduler",
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
            "pagedserve:plugins/types@0.1.0": crate::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host@0.1.0": crate::scheduler::pagedserve::plugins::host,
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
            "pagedserve:plugins/types@0.1.0": crate::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host@0.1.0": crate::scheduler::pagedserve::plugins::host,
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

pub use scheduler::pagedserve::plugins::types::LogLevel;

/// Logging and time through the host interface (the only imports a plugin has).
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
}
