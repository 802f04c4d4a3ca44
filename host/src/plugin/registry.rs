//! The plugin registry: per kind, the plugins by name, each a `PluginSlot` with its versions
//! (sha256, size, load time), the active one and its history. Backs the admin API
//! (`PUT /admin/plugins/{kind}/{name}`, `GET /admin/plugins`, activate, rollback, remove), the
//! start-up configuration (`PluginsConfig`), the engine (scheduler policy, sampler lookups) and
//! the HTTP layer (request filters, in the order they were first installed).
//!
//! Loading compiles on the caller's thread (the admin listener's, never the engine's); a
//! component is refused — leaving what is active unchanged — when it is too large, its sha256 is
//! not the expected one, it is not a component of the kind's world, or its `configure` fails.
//! Scheduler swaps go through `PluginHost::swap_policy` (the engine's `set_policy`, between two
//! engine steps); a new version
//! of the scheduler in use takes effect at the next step. Every change is logged with who asked,
//! the old and new hash and the result.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::filter::{FilterFault, FilterRequest, FilterVerdict, OutputVerdict};
use super::runtime::{CompileError, PluginRuntime};
use super::scheduler::WasmScheduler;
use super::slot::{PluginSlot, PluginVersion};
use super::{FaultReason, PluginKind};
use crate::metrics::Metrics;
use crate::sched::{native_policy, SchedulingPolicy};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("plugin names are 1 to 64 characters of a-z, 0-9, `-` and `_`; got `{0}`")]
    BadName(String),
    #[error("the upload is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("sha256 mismatch: expected {expected}, the upload has {actual}")]
    HashMismatch { expected: String, actual: String },
    #[error("{0}")]
    Compile(CompileError),
    #[error("the plugin's set-up failed: {0}")]
    Setup(String),
    #[error("no {kind} plugin named `{name}`")]
    NotFound { kind: PluginKind, name: String },
    #[error("{0}")]
    Version(String),
    #[error("the engine is not running")]
    EngineDown,
    #[error("{kind} plugin `{name}` is in use by {requests} request(s) in flight; remove it once they have ended")]
    InUse { kind: PluginKind, name: String, requests: usize },
}

impl RegistryError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            RegistryError::BadName(_) | RegistryError::HashMismatch { .. } => 400,
            RegistryError::TooLarge { .. } => 413,
            RegistryError::Compile(CompileError::TooLarge { .. }) => 413,
            RegistryError::Compile(_) | RegistryError::Setup(_) => 422,
            RegistryError::NotFound { .. } => 404,
            RegistryError::Version(_) | RegistryError::InUse { .. } => 409,
            RegistryError::EngineDown => 503,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub version: u32,
    pub sha256: String,
    pub size: usize,
    pub active: bool,
    /// Disabled by the circuit breaker.
    pub disabled: bool,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginInfo {
    pub kind: &'static str,
    pub name: String,
    pub active_version: Option<u32>,
    /// Whether its code runs now: a scheduler that is the engine's policy with an active version;
    /// a filter with an active version (it is in the chain); a sampler or constraint that
    /// requests in the engine named.
    pub in_use: bool,
    /// Requests in the engine that named it (samplers and constraints; 0 for the other kinds).
    pub requests: usize,
    pub faults_in_window: usize,
    pub versions: Vec<VersionInfo>,
}

/// What the registry drives: the engine (`engine::EngineHandle` implements it). A trait, so that
/// the plugin platform sits below the engine in the import graph.
pub trait PluginHost: Send + Sync {
    /// Makes `policy` the scheduling policy from the next step on; `false` if the engine is gone.
    fn swap_policy(&self, policy: Box<dyn SchedulingPolicy>) -> bool;
    /// Hands over the registry, where sampler plugins are looked up; `false` if the engine is gone.
    fn use_registry(&self, registry: Arc<PluginRegistry>) -> bool;
}

pub struct PluginRegistry {
    runtime: Arc<PluginRuntime>,
    metrics: Arc<Metrics>,
    slots: Mutex<BTreeMap<(PluginKind, String), Arc<PluginSlot>>>,
    /// Filters in the order they run.
    filter_order: Mutex<Vec<String>>,
    engine: Mutex<Option<Arc<dyn PluginHost>>>,
    /// The scheduler plugin the engine uses (`None`: a native policy).
    scheduler_in_use: Mutex<Option<String>>,
    /// The native policy the server was started with (`--scheduling-policy`): what ranks when a
    /// scheduler plugin is removed or has no active version.
    native_scheduler: Mutex<String>,
    /// Requests in the engine that named each sampler or constraint plugin (`pin`): such a
    /// plugin is not removed from under them.
    pins: Mutex<HashMap<(PluginKind, String), usize>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName(name.to_string()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PluginRegistry {
    pub fn new(runtime: Arc<PluginRuntime>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(PluginRegistry {
            runtime,
            metrics,
            slots: Mutex::new(BTreeMap::new()),
            filter_order: Mutex::new(Vec::new()),
            engine: Mutex::new(None),
            scheduler_in_use: Mutex::new(None),
            native_scheduler: Mutex::new("fcfs".into()),
            pins: Mutex::new(HashMap::new()),
        })
    }

    /// Sets the native policy (`fcfs`, `priority`) that ranks when no scheduler plugin does: the
    /// server's `--scheduling-policy`. FCFS until set.
    pub fn set_native_scheduler(&self, policy: &str) -> Result<(), RegistryError> {
        if native_policy(policy).is_none() {
            return Err(RegistryError::NotFound { kind: PluginKind::Scheduler, name: policy.into() });
        }
        *lock(&self.native_scheduler) = policy.to_string();
        Ok(())
    }

    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    /// Connects the engine: it looks sampler plugins up here, and scheduler swaps reach it.
    pub fn attach_engine(self: &Arc<Self>, engine: impl PluginHost + 'static) -> Result<(), RegistryError> {
        if !engine.use_registry(self.clone()) {
            return Err(RegistryError::EngineDown);
        }
        *lock(&self.engine) = Some(Arc::new(engine));
        Ok(())
    }

    pub fn slot(&self, kind: PluginKind, name: &str) -> Option<Arc<PluginSlot>> {
        lock(&self.slots).get(&(kind, name.to_string())).cloned()
    }

    fn slot_or_404(&self, kind: PluginKind, name: &str) -> Result<Arc<PluginSlot>, RegistryError> {
        self.slot(kind, name).ok_or_else(|| RegistryError::NotFound { kind, name: name.to_string() })
    }

    /// Admits a request that names the sampler or constraint plugin `kind`/`name`: whether it is
    /// loaded with an active version; if so it counts as in use (`remove` refuses it) until
    /// `unpin`.
    pub fn pin(&self, kind: PluginKind, name: &str) -> bool {
        let key = (kind, name.to_string());
        let slots = lock(&self.slots);
        if slots.get(&key).and_then(|slot| slot.active_version()).is_none() {
            return false;
        }
        *lock(&self.pins).entry(key).or_default() += 1;
        true
    }

    /// A request `pin` admitted has ended.
    pub fn unpin(&self, kind: PluginKind, name: &str) {
        let mut pins = lock(&self.pins);
        let key = (kind, name.to_string());
        if let Some(count) = pins.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&key);
            }
        }
    }

    /// The sampler plugin `name`, if one is loaded (active or not).
    pub fn sampler(&self, name: &str) -> Option<Arc<PluginSlot>> {
        self.slot(PluginKind::Sampler, name)
    }

    /// The constraint plugin `name`, if one is loaded (active or not).
    pub fn constraint(&self, name: &str) -> Option<Arc<PluginSlot>> {
        self.slot(PluginKind::Constraint, name)
    }

    /// Loads a new version of `kind`/`name` from `bytes` and activates it. `expected_sha256`
    /// (hex) must match when given. On any error nothing changes.
    pub fn install(
        &self,
        kind: PluginKind,
        name: &str,
        bytes: &[u8],
        expected_sha256: Option<&str>,
        config: &str,
        who: &str,
    ) -> Result<VersionInfo, RegistryError> {
        let old = self.slot(kind, name).and_then(|s| {
            let inner = s.lock();
            inner.active.and_then(|a| inner.version(a).map(|v| v.sha256.clone()))
        });
        let result = self.install_inner(kind, name, bytes, expected_sha256, config);
        match &result {
            Ok(v) => tracing::info!(who, %kind, name, old = ?old, new = %v.sha256, version = v.version, "plugin installed"),
            Err(e) => tracing::warn!(who, %kind, name, old = ?old, error = %e, "plugin install refused"),
        }
        result
    }

    fn install_inner(
        &self,
        kind: PluginKind,
        name: &str,
        bytes: &[u8],
        expected_sha256: Option<&str>,
        config: &str,
    ) -> Result<VersionInfo, RegistryError> {
        check_name(name)?;
        let limit = self.runtime.limits().max_component_bytes;
        if bytes.len() > limit {
            return Err(RegistryError::TooLarge { size: bytes.len(), limit });
        }
        let sha256 = sha256_hex(bytes);
        if let Some(expected) = expected_sha256 {
            if !expected.trim().eq_ignore_ascii_case(&sha256) {
                return Err(RegistryError::HashMismatch { expected: expected.trim().to_lowercase(), actual: sha256 });
            }
        }
        let compiled = self.runtime.compile(kind, bytes).map_err(RegistryError::Compile)?;
        let version = PluginVersion {
            version: 0,
            sha256,
            size: bytes.len(),
            config: config.to_string(),
            compiled,
            loaded_at: SystemTime::now(),
            disabled: false,
        };
        let slot = self
            .slot(kind, name)
            .unwrap_or_else(|| Arc::new(PluginSlot::new(kind, name, self.runtime.clone(), self.metrics.clone())));
        let live = slot.instantiate(&version).map_err(|(_, message)| RegistryError::Setup(message))?;
        let number = slot.add_version(version, live);
        lock(&self.slots).entry((kind, name.to_string())).or_insert_with(|| slot.clone());
        // Every series of the plugin exists from its first load, at zero, for dashboards and rate().
        let labels = [kind.as_str(), name];
        let _ = self.metrics.plugin_calls.with_label_values(&labels);
        let _ = self.metrics.plugin_call_duration.with_label_values(&labels);
        let _ = self.metrics.plugin_rollbacks.with_label_values(&labels);
        for reason in FaultReason::ALL {
            let _ = self.metrics.plugin_faults.with_label_values(&[kind.as_str(), name, reason.as_str()]);
        }
        if kind == PluginKind::Filter {
            let mut order = lock(&self.filter_order);
            if !order.iter().any(|n| n == name) {
                order.push(name.to_string());
            }
        }
        Ok(self.version_info(&slot, number).expect("just added"))
    }

    fn version_info(&self, slot: &PluginSlot, version: u32) -> Option<VersionInfo> {
        let inner = slot.lock();
        let v = inner.version(version)?;
        Some(VersionInfo {
            version: v.version,
            sha256: v.sha256.clone(),
            size: v.size,
            active: inner.active == Some(version),
            disabled: v.disabled,
            loaded_at: v.loaded_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
    }

    /// Makes version `version` of `kind`/`name` the active one.
    pub fn activate(&self, kind: PluginKind, name: &str, version: u32, who: &str) -> Result<(), RegistryError> {
        let slot = self.slot_or_404(kind, name)?;
        let result = slot.activate(version).map_err(RegistryError::Version);
        tracing::info!(who, %kind, name, version, ok = result.is_ok(), "plugin activate");
        result
    }

    /// Restores the version active before the current one (none: the kind's native fallback).
    pub fn rollback(&self, kind: PluginKind, name: &str, who: &str) -> Result<Option<u32>, RegistryError> {
        let slot = self.slot_or_404(kind, name)?;
        let result = slot.rollback().map_err(RegistryError::Version);
        tracing::info!(who, %kind, name, result = ?result, "plugin rollback");
        result
    }

    /// Unloads every version of `kind`/`name`. A scheduler in use is replaced by the native policy
    /// (`set_native_scheduler`); a sampler or constraint that requests in the engine named is
    /// refused (`InUse`) until they end.
    pub fn remove(&self, kind: PluginKind, name: &str, who: &str) -> Result<(), RegistryError> {
        let slot = {
            let mut slots = lock(&self.slots);
            let key = (kind, name.to_string());
            if !slots.contains_key(&key) {
                return Err(RegistryError::NotFound { kind, name: name.to_string() });
            }
            if let Some(&requests) = lock(&self.pins).get(&key) {
                tracing::info!(who, %kind, name, requests, "plugin remove refused: in use");
                return Err(RegistryError::InUse { kind, name: name.to_string(), requests });
            }
            slots.remove(&key).expect("present")
        };
        slot.clear();
        if kind == PluginKind::Filter {
            lock(&self.filter_order).retain(|n| n != name);
        }
        if kind == PluginKind::Scheduler && lock(&self.scheduler_in_use).as_deref() == Some(name) {
            let native = lock(&self.native_scheduler).clone();
            self.use_native_scheduler(&native, who)?;
        }
        tracing::info!(who, %kind, name, "plugin removed");
        Ok(())
    }

    /// Makes the scheduler plugin `name` the engine's policy (from the next step on).
    pub fn use_scheduler(&self, name: &str, who: &str) -> Result<(), RegistryError> {
        let slot = self.slot_or_404(PluginKind::Scheduler, name)?;
        let engine = lock(&self.engine).clone().ok_or(RegistryError::EngineDown)?;
        let fallback = native_policy(&lock(&self.native_scheduler)).expect("set_native_scheduler checked the name");
        if !engine.swap_policy(Box::new(WasmScheduler::new(slot, fallback))) {
            return Err(RegistryError::EngineDown);
        }
        let old = lock(&self.scheduler_in_use).replace(name.to_string());
        self.metrics.plugin_swaps.with_label_values(&["scheduler", name]).inc();
        tracing::info!(who, old = ?old, new = name, "scheduler plugin in use");
        Ok(())
    }

    /// Makes a native policy (`fcfs`, `priority`) the engine's policy.
    pub fn use_native_scheduler(&self, policy: &str, who: &str) -> Result<(), RegistryError> {
        let native = native_policy(policy).ok_or_else(|| RegistryError::NotFound { kind: PluginKind::Scheduler, name: policy.into() })?;
        let engine = lock(&self.engine).clone().ok_or(RegistryError::EngineDown)?;
        if !engine.swap_policy(native) {
            return Err(RegistryError::EngineDown);
        }
        let old = lock(&self.scheduler_in_use).take();
        tracing::info!(who, old = ?old, new = policy, "native scheduling policy in use");
        Ok(())
    }

    /// What is loaded, per kind and name, with versions and hashes.
    pub fn list(&self) -> Vec<PluginInfo> {
        let slots: Vec<Arc<PluginSlot>> = lock(&self.slots).values().cloned().collect();
        let scheduler = lock(&self.scheduler_in_use).clone();
        let pins = lock(&self.pins).clone();
        slots
            .iter()
            .map(|slot| {
                let (active, faults, numbers) = {
                    let inner = slot.lock();
                    (inner.active, inner.faults_in_window(), inner.versions.iter().map(|v| v.version).collect::<Vec<_>>())
                };
                let requests = pins.get(&(slot.kind(), slot.name().to_string())).copied().unwrap_or(0);
                let in_use = match slot.kind() {
                    PluginKind::Scheduler => scheduler.as_deref() == Some(slot.name()) && active.is_some(),
                    PluginKind::Filter => active.is_some(),
                    PluginKind::Sampler | PluginKind::Constraint => requests > 0,
                };
                PluginInfo {
                    kind: slot.kind().as_str(),
                    name: slot.name().to_string(),
                    active_version: active,
                    in_use,
                    requests,
                    faults_in_window: faults,
                    versions: numbers.into_iter().filter_map(|n| self.version_info(slot, n)).collect(),
                }
            })
            .collect()
    }

    /// Names of the filters, in the order they run.
    pub fn filters(&self) -> Vec<String> {
        lock(&self.filter_order).clone()
    }

    /// Runs every filter on a request, in order: `Modify` rewrites the parameters the next filter
    /// sees, the first `Reject` ends it. Answers `Modify` with the final parameters if any filter
    /// rewrote them. A fault, or a filter disabled with nothing to restore, fails closed.
    pub fn filter_request(&self, request: &FilterRequest) -> Result<FilterVerdict, FilterFault> {
        self.run_filters(request).map(|(verdict, _)| verdict)
    }

    /// `filter_request`, also naming the filter that rejected the request (if one did).
    pub fn run_filters(&self, request: &FilterRequest) -> Result<(FilterVerdict, Option<String>), FilterFault> {
        let mut current = request.clone();
        let mut modified = false;
        for name in self.filters() {
            let Some(slot) = self.slot(PluginKind::Filter, &name) else { continue };
            match slot.on_request(&current).map_err(|error| FilterFault { plugin: name.clone(), error })? {
                FilterVerdict::Continue => {}
                FilterVerdict::Modify(params) => {
                    current.params = params;
                    modified = true;
                }
                reject @ FilterVerdict::Reject { .. } => return Ok((reject, Some(name))),
            }
        }
        Ok((if modified { FilterVerdict::Modify(current.params) } else { FilterVerdict::Continue }, None))
    }

    /// Runs every filter's `on-output`; the first `Stop` wins, with the name of the filter.
    pub fn run_output_filters(
        &self,
        tenant: &str,
        text_so_far: &str,
        generated_tokens: u32,
    ) -> Result<Option<(String, String)>, FilterFault> {
        for name in self.filters() {
            let Some(slot) = self.slot(PluginKind::Filter, &name) else { continue };
            let verdict = slot
                .on_output(tenant, text_so_far, generated_tokens)
                .map_err(|error| FilterFault { plugin: name.clone(), error })?;
            if let OutputVerdict::Stop(reason) = verdict {
                return Ok(Some((name, reason)));
            }
        }
        Ok(None)
    }
}
