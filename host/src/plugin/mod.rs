//! The plugin host: scheduling policies, sampling strategies, request filters and output
//! constraints as sandboxed WebAssembly components of the `pagedserve:plugins@0.2.0` WIT package
//! (`wit/plugins.wit`); components built for 0.1.0 (`wit/0.1.0`) load too.
//!
//! Stages, as wasmtime's `serve` and Spin build them: a component is compiled once per version,
//! off the serving path, into an `InstancePre` (`runtime`); a slot per (kind, name) keeps its
//! versions and one live instance in its own `Store` (`slot`); the engine, the HTTP layer and the
//! admin API reach slots through the `PluginRegistry` (`registry`).
//!
//! Invariants the host keeps whatever a plugin does:
//! - no WASI capability is linked: a component may import our `host` interface; WASI imports the
//!   Rust standard library declares are satisfied by functions that trap; anything else is refused;
//! - every call runs under an epoch deadline (one ticker thread, a budget per kind) and with
//!   `StoreLimits` on memory, tables and instances; a trap, a deadline or a limit drops the Store,
//!   and the next call starts from a fresh instance (`configure` runs again);
//! - every answer is validated (`answers`: rankings, samples, verdicts, masks): an invalid answer is a fault like
//!   a trap, with reason `invalid_output`;
//! - fail policy per kind: scheduler → the step runs native FCFS; sampler and constraint → only
//!   the requests that chose it fail, with an error naming the plugin; filter → the request fails
//!   closed (5xx naming the plugin);
//! - circuit breaker: K faults within a window disable the version and restore the previous one
//!   (or the native fallback when there is none). Faults, swaps and rollbacks are counted in
//!   `metrics` and logged.

pub mod answers;
mod bindings;
mod config;
mod constraint;
mod filter;
mod registry;
mod runtime;
mod sampler;
mod scheduler;
mod slot;

pub use self::config::{PluginEntry, PluginsConfig};
pub use self::constraint::{ConstraintStart, ConstraintStep};
pub use self::filter::{FilterFault, FilterParams, FilterRequest, FilterVerdict, OutputVerdict};
pub use self::registry::{sha256_hex, PluginHost, PluginInfo, PluginRegistry, RegistryError, VersionInfo};
pub use self::runtime::{CompileError, PluginLimits, PluginRuntime};
pub use self::sampler::{top_candidates, PluginSampleInput, PluginSampled};
pub use self::scheduler::WasmScheduler;
pub use self::slot::{PluginSlot, MAX_VERSIONS};

/// The four kinds of plugins, one WIT world each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PluginKind {
    Scheduler,
    Sampler,
    Filter,
    Constraint,
}

impl PluginKind {
    pub const ALL: [PluginKind; 4] = [PluginKind::Scheduler, PluginKind::Sampler, PluginKind::Filter, PluginKind::Constraint];

    /// The WIT world's name, also the kind's name in URLs, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Scheduler => "scheduler",
            PluginKind::Sampler => "sampler",
            PluginKind::Filter => "filter",
            PluginKind::Constraint => "constraint",
        }
    }

    pub fn parse(s: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a plugin call failed; the stable label is the `reason` of `plugin_faults_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The guest trapped (a panic, `unreachable`, an error from `configure`, a trapping WASI stub).
    Trap,
    /// The call ran past its epoch deadline.
    Deadline,
    /// The guest hit a resource limit (memory, tables, instances, stack).
    Limit,
    /// The answer broke the contract (unknown or duplicate ids, out-of-range tokens, too large).
    InvalidOutput,
}

impl FaultReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [FaultReason; 4] = [FaultReason::Trap, FaultReason::Deadline, FaultReason::Limit, FaultReason::InvalidOutput];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultReason::Trap => "trap",
            FaultReason::Deadline => "deadline",
            FaultReason::Limit => "limit",
            FaultReason::InvalidOutput => "invalid_output",
        }
    }
}

/// A failed plugin call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("{kind} plugin `{name}` failed ({}): {message}", reason.as_str())]
    Fault { kind: PluginKind, name: String, reason: FaultReason, message: String },
    /// The slot has no active version (never loaded, removed, or disabled by the circuit breaker
    /// with nothing to restore).
    #[error("{kind} plugin `{name}` is not active")]
    Inactive { kind: PluginKind, name: String },
}

impl PluginError {
    pub fn reason(&self) -> Option<FaultReason> {
        match self {
            PluginError::Fault { reason, .. } => Some(*reason),
            PluginError::Inactive { .. } => None,
        }
    }
}
