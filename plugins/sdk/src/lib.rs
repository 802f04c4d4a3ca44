//! The guest SDK for pagedserve plugins: the WIT bindings of the three worlds (`scheduler`,
//! `sampler`, `filter`) generated once here, and small helpers, so that a plugin is a short crate:
//!
//! ```ignore
//! use pagedserve_plugin_sdk::scheduler::{export_scheduler, Guest, SeqView, Budget};
//! struct Fcfs;
//! impl Guest for Fcfs {
//!     fn configure(_: String) -> Result<(), String> { Ok(()) }
//!     fn rank(seqs: Vec<SeqView>, _: Budget) -> Result<Vec<u64>, String> { ... }
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

    /// A waiting sequence with the given id and arrival and small defaults (4 prompt tokens, at
    /// most 8 new, priority 0, no tenant): the starting point of a plugin's tests, which then
    /// set the fields they care about with struct-update syntax.
    pub fn seq_view(id: u64, arrival: u64) -> SeqView {
        SeqView {
            id,
            priority: 0,
            tenant: String::new(),
            arrival,
            prompt_tokens: 4,
            computed_tokens: 0,
            generated_tokens: 0,
            max_tokens: 8,
            blocks_held: 0,
            running: false,
        }
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
