//! The wasmtime side: one `Engine` (Cranelift, component model, epoch interruption) with its
//! ticker thread, the limits every plugin runs under, compilation of a component into a typed
//! `InstancePre` of its world (once per version, off the serving path), and the per-Store state
//! (`StoreState`) that holds the limits and implements the `host` interface.
//!
//! WASI stance: nothing of WASI is linked. A component may import `pagedserve:plugins/host`;
//! imports of `wasi:*` interfaces (which the Rust standard library declares for stdio, environment
//! and exit even when a plugin never uses them) are defined as functions that trap when called;
//! a component importing anything else is refused at load.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap};

use super::bindings::{constraint, filter, host, sampler, scheduler, types, v0_1};
use super::{FaultReason, PluginKind};

/// The limits and budgets plugins run under.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginLimits {
    /// Wall-time budget of one scheduler `rank` call.
    pub scheduler_deadline: Duration,
    /// Wall-time budget of one sampler `sample` call (the whole batch of its sequences).
    pub sampler_deadline: Duration,
    /// Wall-time budget of one filter call.
    pub filter_deadline: Duration,
    /// Wall-time budget of one constraint call (`start`, or one step's `next` for all its
    /// sequences).
    pub constraint_deadline: Duration,
    /// Budget of instantiation plus `configure` (and `top-n`).
    pub setup_deadline: Duration,
    /// Granularity of deadlines: the epoch ticker's period.
    pub epoch_tick: Duration,
    /// Linear memory of one instance, in bytes.
    pub max_memory_bytes: usize,
    /// Elements of one table.
    pub max_table_elements: usize,
    /// Wasm stack of one call, in bytes (unbounded recursion hits it).
    pub max_wasm_stack: usize,
    /// Largest component accepted for loading, in bytes.
    pub max_component_bytes: usize,
    /// Circuit breaker: this many faults within `breaker_window` disable a version.
    pub breaker_faults: usize,
    pub breaker_window: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            scheduler_deadline: Duration::from_millis(20),
            sampler_deadline: Duration::from_millis(50),
            filter_deadline: Duration::from_millis(20),
            constraint_deadline: Duration::from_millis(20),
            setup_deadline: Duration::from_millis(500),
            epoch_tick: Duration::from_millis(1),
            max_memory_bytes: 64 << 20,
            max_table_elements: 100_000,
            max_wasm_stack: 512 << 10,
            max_component_bytes: 16 << 20,
            breaker_faults: 5,
            breaker_window: Duration::from_secs(60),
        }
    }
}

impl PluginLimits {
    pub fn deadline(&self, kind: PluginKind) -> Duration {
        match kind {
            PluginKind::Scheduler => self.scheduler_deadline,
            PluginKind::Sampler => self.sampler_deadline,
            PluginKind::Filter => self.filter_deadline,
            PluginKind::Constraint => self.constraint_deadline,
        }
    }
}

/// A component compiled for its world, ready to instantiate (one per plugin version).
#[derive(Clone)]
pub(crate) enum Compiled {
    Scheduler(scheduler::SchedulerPre<StoreState>),
    Sampler(sampler::SamplerPre<StoreState>),
    Filter(filter::FilterPre<StoreState>),
    Constraint(constraint::ConstraintPre<StoreState>),
}

/// Why a component was refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("the component is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error("the component imports `{0}`; plugins may import only pagedserve:plugins/host (and WASI, which is not provided)")]
    ForbiddenImport(String),
    #[error("the component is not a `{expected}` plugin (world pagedserve:plugins/{expected}@0.2.0 or 0.1.0){}: {detail}", found.map(|k| format!("; it is a `{k}` plugin")).unwrap_or_default())]
    WrongWorld { expected: PluginKind, found: Option<PluginKind>, detail: String },
}

/// The plugin host's wasmtime engine and limits; one per server.
pub struct PluginRuntime {
    engine: Engine,
    limits: PluginLimits,
    /// The model's vocabulary as bytes, for `host.vocabulary` (set once the tokenizer is known).
    vocabulary: OnceLock<Arc<Vec<Vec<u8>>>>,
}

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl PluginRuntime {
    /// Builds the engine and starts its epoch ticker (which ends when the engine is dropped).
    pub fn new(limits: PluginLimits) -> anyhow::Result<Arc<PluginRuntime>> {
        process_start();
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(limits.max_wasm_stack);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("creating the wasm engine: {e}"))?;
        let weak = engine.weak();
        let tick = limits.epoch_tick;
        std::thread::Builder::new()
            .name("pagedserve-plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            })?;
        Ok(Arc::new(PluginRuntime { engine, limits, vocabulary: OnceLock::new() }))
    }

    /// Gives plugins the model's vocabulary (`host.vocabulary`); the first call wins.
    pub fn set_vocabulary(&self, vocabulary: Vec<Vec<u8>>) {
        let _ = self.vocabulary.set(Arc::new(vocabulary));
    }

    pub fn limits(&self) -> &PluginLimits {
        &self.limits
    }

    /// Epoch ticks for a wall-time budget (one more than the quotient: the current tick is partly
    /// gone already).
    pub(crate) fn ticks(&self, budget: Duration) -> u64 {
        (budget.as_nanos() / self.limits.epoch_tick.as_nanos().max(1)).max(1) as u64 + 1
    }

    /// Compiles `bytes` as a `kind` plugin: checks the size, that it is a component, that it
    /// imports nothing but our host interface (and WASI, stubbed), and that it implements the
    /// kind's world. Slow (Cranelift): never call it on the engine thread.
    pub(crate) fn compile(&self, kind: PluginKind, bytes: &[u8]) -> Result<Compiled, CompileError> {
        if bytes.len() > self.limits.max_component_bytes {
            return Err(CompileError::TooLarge { size: bytes.len(), limit: self.limits.max_component_bytes });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        for (name, _) in component.component_type().imports(&self.engine) {
            if !(name.starts_with("pagedserve:plugins/") || name.starts_with("wasi:")) {
                return Err(CompileError::ForbiddenImport(name.to_string()));
            }
        }
        match self.compile_as(kind, &component) {
            Ok(compiled) => Ok(compiled),
            Err(detail) => {
                let found = PluginKind::ALL.into_iter().find(|&k| k != kind && self.compile_as(k, &component).is_ok());
                Err(CompileError::WrongWorld { expected: kind, found, detail })
            }
        }
    }

    fn compile_as(&self, kind: PluginKind, component: &Component) -> Result<Compiled, String> {
        let mut linker: Linker<StoreState> = Linker::new(&self.engine);
        let e = |e: wasmtime::Error| format!("{e:#}");
        match kind {
            PluginKind::Scheduler => scheduler::Scheduler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s),
            PluginKind::Sampler => sampler::Sampler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s),
            PluginKind::Filter => filter::Filter::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s),
            PluginKind::Constraint => constraint::Constraint::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s),
        }
        .map_err(e)?;
        // Components built for 0.1.0 import its `host` and `types`: the same functions.
        if kind != PluginKind::Constraint {
            v0_1::Scheduler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(e)?;
        }
        linker.define_unknown_imports_as_traps(component).map_err(e)?;
        let pre = linker.instantiate_pre(component).map_err(e)?;
        Ok(match kind {
            PluginKind::Scheduler => Compiled::Scheduler(scheduler::SchedulerPre::new(pre).map_err(e)?),
            PluginKind::Sampler => Compiled::Sampler(sampler::SamplerPre::new(pre).map_err(e)?),
            PluginKind::Filter => Compiled::Filter(filter::FilterPre::new(pre).map_err(e)?),
            PluginKind::Constraint => Compiled::Constraint(constraint::ConstraintPre::new(pre).map_err(e)?),
        })
    }

    /// A fresh Store for one instance of a plugin, with its limits; deadlines trap.
    pub(crate) fn new_store(&self, kind: PluginKind, name: &str, config: &str) -> Store<StoreState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory_bytes)
            .table_elements(self.limits.max_table_elements)
            .instances(64)
            .tables(64)
            .memories(16)
            .trap_on_grow_failure(true)
            .build();
        let vocabulary = self.vocabulary.get().cloned().unwrap_or_default();
        let state = StoreState { kind, name: name.into(), config: config.into(), vocabulary, limits, limit_hit: false };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.ticks(self.limits.setup_deadline));
        store
    }
}

/// What one Store holds: the plugin's identity and configuration (for the `host` interface) and
/// its limits.
pub(crate) struct StoreState {
    kind: PluginKind,
    name: Arc<str>,
    config: Arc<str>,
    vocabulary: Arc<Vec<Vec<u8>>>,
    limits: StoreLimits,
    /// Set when a limit refused a request of the guest: the fault that follows is a `limit`.
    pub(crate) limit_hit: bool,
}

impl ResourceLimiter for StoreState {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let answer = self.limits.memory_growing(current, desired, maximum);
        self.limit_hit |= !matches!(answer, Ok(true));
        answer
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let answer = self.limits.table_growing(current, desired, maximum);
        self.limit_hit |= !matches!(answer, Ok(true));
        answer
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 1024;

impl host::Host for StoreState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        let (kind, name) = (self.kind.as_str(), &*self.name);
        match level {
            types::LogLevel::Trace => tracing::trace!(kind, name, "plugin: {message}"),
            types::LogLevel::Debug => tracing::debug!(kind, name, "plugin: {message}"),
            types::LogLevel::Info => tracing::info!(kind, name, "plugin: {message}"),
            types::LogLevel::Warn => tracing::warn!(kind, name, "plugin: {message}"),
            types::LogLevel::Error => tracing::error!(kind, name, "plugin: {message}"),
        }
    }

    fn now(&mut self) -> u64 {
        process_start().elapsed().as_nanos() as u64
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }

    fn vocabulary(&mut self) -> Vec<Vec<u8>> {
        self.vocabulary.to_vec()
    }
}

impl types::Host for StoreState {}

/// 0.1.0's `host`: the same functions (it has no `vocabulary`).
impl v0_1::host::Host for StoreState {
    fn log(&mut self, level: v0_1::types::LogLevel, message: String) {
        let level = match level {
            v0_1::types::LogLevel::Trace => types::LogLevel::Trace,
            v0_1::types::LogLevel::Debug => types::LogLevel::Debug,
            v0_1::types::LogLevel::Info => types::LogLevel::Info,
            v0_1::types::LogLevel::Warn => types::LogLevel::Warn,
            v0_1::types::LogLevel::Error => types::LogLevel::Error,
        };
        host::Host::log(self, level, message)
    }

    fn now(&mut self) -> u64 {
        host::Host::now(self)
    }

    fn config(&mut self) -> String {
        host::Host::config(self)
    }
}

impl v0_1::types::Host for StoreState {}

/// The fault a failed call amounts to.
pub(crate) fn classify(error: &wasmtime::Error, limit_hit: bool) -> FaultReason {
    if limit_hit {
        return FaultReason::Limit;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => FaultReason::Deadline,
        Some(Trap::StackOverflow) => FaultReason::Limit,
        _ => FaultReason::Trap,
    }
}
