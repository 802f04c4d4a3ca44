//! One plugin name of one kind: its versions (each compiled once into an `InstancePre`), which
//! one is active, the one live instance of it in its own Store, and its circuit breaker.
//!
//! Calls are serialized by the slot's lock (a plugin instance is single-threaded; stateful
//! plugins such as `rate-limit` see every call in order). Every call gets the kind's deadline; a
//! trap, deadline or limit drops the Store and the next call instantiates afresh; `breaker_faults`
//! faults within `breaker_window` disable the active version and restore the one activated before
//! it (or leave the slot inactive: the kind's native fallback).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use wasmtime::Store;

use super::bindings::{constraint, filter, sampler, scheduler};
use super::constraint::Started;
use super::runtime::{classify, Compiled, PluginRuntime, StoreState};
use super::{FaultReason, PluginError, PluginKind};
use crate::metrics::Metrics;

/// Most candidates a sampler may ask for per sequence.
pub const MAX_TOP_N: u32 = 1024;

pub(crate) struct PluginVersion {
    pub version: u32,
    pub sha256: String,
    pub size: usize,
    pub config: String,
    pub compiled: Compiled,
    pub loaded_at: SystemTime,
    /// Disabled by the circuit breaker: never activated again by a rollback.
    pub disabled: bool,
}

/// A live instance and its Store.
pub(crate) enum Live {
    Scheduler { store: Store<StoreState>, plugin: scheduler::Scheduler },
    Sampler { store: Store<StoreState>, plugin: sampler::Sampler, top_n: u32 },
    Filter { store: Store<StoreState>, plugin: filter::Filter },
    /// `started`: the sequences this instance has been given (`start`); a fresh instance has none.
    Constraint { store: Store<StoreState>, plugin: constraint::Constraint, started: Started },
}

impl Live {
    fn store_mut(&mut self) -> &mut Store<StoreState> {
        match self {
            Live::Scheduler { store, .. } | Live::Sampler { store, .. } | Live::Filter { store, .. } | Live::Constraint { store, .. } => {
                store
            }
        }
    }
}

/// How a call went wrong, before it is classified as a fault.
pub(crate) enum CallFailure {
    /// The call trapped, ran out of time or hit a limit.
    Wasm(wasmtime::Error),
    /// The call returned, but its answer breaks the contract.
    Invalid(String),
}

impl From<wasmtime::Error> for CallFailure {
    fn from(e: wasmtime::Error) -> Self {
        CallFailure::Wasm(e)
    }
}

/// Versions a slot keeps: the active one and the most recent others, for activation and rollback.
pub const MAX_VERSIONS: usize = 8;

#[derive(Default)]
pub(crate) struct SlotInner {
    pub versions: Vec<PluginVersion>,
    pub active: Option<u32>,
    /// Versions in the order they were activated; the active one last.
    pub history: Vec<u32>,
    live: Option<Live>,
    faults: VecDeque<Instant>,
    pub next_version: u32,
}

impl SlotInner {
    pub fn version(&self, version: u32) -> Option<&PluginVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    fn version_mut(&mut self, version: u32) -> Option<&mut PluginVersion> {
        self.versions.iter_mut().find(|v| v.version == version)
    }

    pub fn faults_in_window(&self) -> usize {
        self.faults.len()
    }
}

pub struct PluginSlot {
    kind: PluginKind,
    name: String,
    runtime: Arc<PluginRuntime>,
    metrics: Arc<Metrics>,
    inner: Mutex<SlotInner>,
}

impl PluginSlot {
    pub(crate) fn new(kind: PluginKind, name: &str, runtime: Arc<PluginRuntime>, metrics: Arc<Metrics>) -> Self {
        PluginSlot { kind, name: name.to_string(), runtime, metrics, inner: Mutex::new(SlotInner::default()) }
    }

    pub fn kind(&self) -> PluginKind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SlotInner> {
        // A panic while holding the lock leaves consistent data (calls are whole or dropped).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The active version, if any.
    pub fn active_version(&self) -> Option<u32> {
        self.lock().active
    }

    /// Instantiates a version and runs its set-up (`configure`, and `top-n` for samplers) under
    /// the set-up deadline.
    pub(crate) fn instantiate(&self, v: &PluginVersion) -> Result<Live, (FaultReason, String)> {
        let mut store = self.runtime.new_store(self.kind, &self.name, &v.config);
        let fail = |store: &Store<StoreState>, e: wasmtime::Error| (classify(&e, store.data().limit_hit), format!("{e:#}"));
        let refused = |message: String| (FaultReason::Trap, format!("configure refused: {message}"));
        match &v.compiled {
            Compiled::Scheduler(pre) => {
                let plugin = pre.instantiate(&mut store).map_err(|e| fail(&store, e))?;
                plugin.call_configure(&mut store, &v.config).map_err(|e| fail(&store, e))?.map_err(refused)?;
                Ok(Live::Scheduler { store, plugin })
            }
            Compiled::Sampler(pre) => {
                let plugin = pre.instantiate(&mut store).map_err(|e| fail(&store, e))?;
                plugin.call_configure(&mut store, &v.config).map_err(|e| fail(&store, e))?.map_err(refused)?;
                let top_n = plugin.call_top_n(&mut store).map_err(|e| fail(&store, e))?;
                if !(1..=MAX_TOP_N).contains(&top_n) {
                    return Err((FaultReason::InvalidOutput, format!("top-n must be in 1..={MAX_TOP_N}, got {top_n}")));
                }
                Ok(Live::Sampler { store, plugin, top_n })
            }
            Compiled::Filter(pre) => {
                let plugin = pre.instantiate(&mut store).map_err(|e| fail(&store, e))?;
                plugin.call_configure(&mut store, &v.config).map_err(|e| fail(&store, e))?.map_err(refused)?;
                Ok(Live::Filter { store, plugin })
            }
            Compiled::Constraint(pre) => {
                let plugin = pre.instantiate(&mut store).map_err(|e| fail(&store, e))?;
                plugin.call_configure(&mut store, &v.config).map_err(|e| fail(&store, e))?.map_err(refused)?;
                Ok(Live::Constraint { store, plugin, started: Started::default() })
            }
        }
    }

    /// Adds a version (already probed: `live` is its first instance) and activates it. Past
    /// `MAX_VERSIONS`, inactive versions are dropped, compiled code and all, and leave the rollback
    /// history: an operator who swaps all day holds bounded memory (the soak test found ~0.2 MB
    /// kept per upload). Dropped first: disabled versions, then those never activated since,
    /// then the least recently activated; the one a rollback would restore goes last.
    pub(crate) fn add_version(&self, mut version: PluginVersion, live: Live) -> u32 {
        let mut inner = self.lock();
        inner.next_version += 1;
        version.version = inner.next_version;
        let number = version.version;
        inner.versions.push(version);
        self.switch_to(&mut inner, Some(number), "install");
        inner.live = Some(live);
        while inner.versions.len() > MAX_VERSIONS {
            let active = inner.active;
            // Where each version was last activated (-1: not in the history).
            let last_active = |v: u32| inner.history.iter().rposition(|&h| h == v).map_or(-1, |p| p as i64);
            let Some(victim) = inner
                .versions
                .iter()
                .enumerate()
                .filter(|(_, v)| Some(v.version) != active)
                .min_by_key(|(_, v)| (!v.disabled, last_active(v.version)))
                .map(|(i, _)| i)
            else {
                break;
            };
            let dropped = inner.versions.remove(victim).version;
            inner.history.retain(|&v| v != dropped);
            inner.history.dedup();
            tracing::info!(kind = %self.kind, name = %self.name, version = dropped, "least recently used plugin version dropped");
        }
        number
    }

    /// Makes `version` the active one (the next call uses a fresh instance of it).
    pub(crate) fn activate(&self, version: u32) -> Result<(), String> {
        let mut inner = self.lock();
        match inner.version(version) {
            None => return Err(format!("{} plugin `{}` has no version {version}", self.kind, self.name)),
            Some(v) if v.disabled => {
                tracing::info!(kind = %self.kind, name = %self.name, version, "re-enabling a version the circuit breaker disabled");
            }
            Some(_) => {}
        }
        inner.version_mut(version).unwrap().disabled = false;
        self.switch_to(&mut inner, Some(version), "activate");
        Ok(())
    }

    /// Restores the version activated before the active one; returns it (`None`: nothing to
    /// restore, the slot is now inactive).
    pub(crate) fn rollback(&self) -> Result<Option<u32>, String> {
        let mut inner = self.lock();
        if inner.active.is_none() {
            return Err(format!("{} plugin `{}` has no active version to roll back", self.kind, self.name));
        }
        let restored = self.rollback_locked(&mut inner, "rollback");
        Ok(restored)
    }

    fn rollback_locked(&self, inner: &mut SlotInner, why: &str) -> Option<u32> {
        let current = inner.active;
        // Drop the current version from the history, then every version that is gone or disabled.
        if let Some(current) = current {
            if let Some(pos) = inner.history.iter().rposition(|&v| v == current) {
                inner.history.truncate(pos);
            }
        }
        while let Some(&last) = inner.history.last() {
            if Some(last) != current && inner.version(last).is_some_and(|v| !v.disabled) {
                break;
            }
            inner.history.pop();
        }
        let restored = inner.history.pop();
        self.switch_to(inner, restored, why);
        self.metrics.plugin_rollbacks.with_label_values(&[self.kind.as_str(), &self.name]).inc();
        restored
    }

    /// Deactivates and forgets every version.
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        self.switch_to(&mut inner, None, "remove");
        inner.versions.clear();
        inner.history.clear();
    }

    fn switch_to(&self, inner: &mut SlotInner, version: Option<u32>, why: &str) {
        let (kind, name) = (self.kind.as_str(), self.name.as_str());
        let old = inner.active;
        if let Some(old) = old.and_then(|o| inner.version(o)) {
            let _ = self.metrics.plugin_active_info.remove_label_values(&[kind, name, &old.version.to_string(), &old.sha256]);
        }
        inner.active = version;
        inner.live = None;
        inner.faults.clear();
        if let Some(v) = version {
            // No entry twice in a row (activating the active version again adds nothing), and a
            // bounded length: rollbacks walk back at most this far.
            if inner.history.last() != Some(&v) {
                inner.history.push(v);
            }
            let excess = inner.history.len().saturating_sub(4 * MAX_VERSIONS);
            inner.history.drain(..excess);
            let sha = inner.version(v).map(|v| v.sha256.clone()).unwrap_or_default();
            self.metrics.plugin_active_info.with_label_values(&[kind, name, &v.to_string(), &sha]).set(1);
        }
        self.metrics.plugin_swaps.with_label_values(&[kind, name]).inc();
        tracing::info!(kind, name, ?old, new = ?version, why, "plugin version switched");
    }

    /// Runs one call on the live instance (instantiating it first if needed) under the kind's
    /// deadline, classifies failures, and feeds the circuit breaker.
    pub(crate) fn call<T>(&self, f: impl FnOnce(&mut Live) -> Result<T, CallFailure>) -> Result<T, PluginError> {
        let (kind, name) = (self.kind.as_str(), self.name.as_str());
        let mut inner = self.lock();
        self.ensure_live(&mut inner)?;
        let ticks = self.runtime.ticks(self.runtime.limits().deadline(self.kind));
        let live = inner.live.as_mut().unwrap();
        let store = live.store_mut();
        store.data_mut().limit_hit = false;
        store.set_epoch_deadline(ticks);
        let started = Instant::now();
        let result = f(live);
        self.metrics.plugin_calls.with_label_values(&[kind, name]).inc();
        self.metrics.plugin_call_duration.with_label_values(&[kind, name]).observe(started.elapsed().as_secs_f64());
        match result {
            Ok(value) => Ok(value),
            Err(CallFailure::Wasm(error)) => {
                let limit_hit = inner.live.as_mut().is_some_and(|l| l.store_mut().data().limit_hit);
                let reason = classify(&error, limit_hit);
                // A fresh Store for the next call: this one may be mid-way through anything.
                inner.live = None;
                // The whole chain (with the Wasm backtrace) goes to the log; the error, which
                // reaches API clients, says only what went wrong.
                Err(self.fault_with_detail(&mut inner, reason, error.root_cause().to_string(), &format!("{error:#}")))
            }
            Err(CallFailure::Invalid(message)) => Err(self.fault(&mut inner, FaultReason::InvalidOutput, message)),
        }
    }

    /// Reads something of the live instance (instantiating it if needed) without calling it.
    pub(crate) fn call_setup<T>(&self, f: impl FnOnce(&mut Live) -> T) -> Result<T, PluginError> {
        let mut inner = self.lock();
        self.ensure_live(&mut inner)?;
        Ok(f(inner.live.as_mut().unwrap()))
    }

    fn ensure_live(&self, inner: &mut SlotInner) -> Result<(), PluginError> {
        let Some(active) = inner.active else {
            return Err(PluginError::Inactive { kind: self.kind, name: self.name.clone() });
        };
        if inner.live.is_none() {
            let version = inner.version(active).expect("active version exists");
            match self.instantiate(version) {
                Ok(live) => inner.live = Some(live),
                Err((reason, message)) => return Err(self.fault(inner, reason, format!("instantiating: {message}"))),
            }
        }
        Ok(())
    }

    fn fault(&self, inner: &mut SlotInner, reason: FaultReason, message: String) -> PluginError {
        let detail = message.clone();
        self.fault_with_detail(inner, reason, message, &detail)
    }

    /// A fault whose log line carries `detail` (e.g. a Wasm backtrace) and whose error, which
    /// reaches clients, carries `message`.
    fn fault_with_detail(&self, inner: &mut SlotInner, reason: FaultReason, message: String, detail: &str) -> PluginError {
        let (kind, name) = (self.kind.as_str(), self.name.as_str());
        self.metrics.plugin_faults.with_label_values(&[kind, name, reason.as_str()]).inc();
        tracing::warn!(kind, name, version = ?inner.active, reason = reason.as_str(), message = detail, "plugin fault");
        let now = Instant::now();
        let window = self.runtime.limits().breaker_window;
        inner.faults.push_back(now);
        while inner.faults.front().is_some_and(|&t| now.duration_since(t) > window) {
            inner.faults.pop_front();
        }
        if inner.faults.len() >= self.runtime.limits().breaker_faults {
            if let Some(active) = inner.active {
                if let Some(v) = inner.version_mut(active) {
                    v.disabled = true;
                }
                let restored = self.rollback_locked(inner, "circuit breaker");
                tracing::error!(
                    kind,
                    name,
                    disabled = active,
                    ?restored,
                    "circuit breaker: too many faults; version disabled{}",
                    if restored.is_none() { ", native fallback" } else { ", previous version restored" }
                );
            }
        }
        PluginError::Fault { kind: self.kind, name: self.name.clone(), reason, message }
    }
}
