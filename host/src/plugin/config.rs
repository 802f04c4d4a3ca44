//! The start-up plugin configuration: a JSON file naming the plugins to load before serving.
//!
//! ```json
//! {
//!   "scheduler": {"name": "fair-share", "path": "plugins/dist/fair-share.wasm",
//!                 "config": {"weights": {"acme": 2}}},
//!   "samplers":  [{"name": "mirostat", "path": "plugins/dist/mirostat.wasm", "sha256": "..."}],
//!   "filters":   [{"name": "api-keys", "path": "plugins/dist/api-keys.wasm",
//!                  "config": {"keys": {"sk-1": {"tenant": "acme"}}}},
//!                 {"name": "rate-limit", "path": "plugins/dist/rate-limit.wasm"}],
//!   "constraints": [{"name": "no-digits", "path": "plugins/dist/no-digits.wasm"}]
//! }
//! ```
//!
//! `path` is relative to the file's directory; `sha256` (hex) is checked when given; `config` is
//! any JSON value, handed to the plugin's `configure` as JSON text (a JSON string is handed over
//! as its content). Filters run in the order listed. The scheduler becomes the engine's policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use super::{PluginKind, PluginRegistry};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    #[serde(default)]
    pub scheduler: Option<PluginEntry>,
    #[serde(default)]
    pub samplers: Vec<PluginEntry>,
    #[serde(default)]
    pub filters: Vec<PluginEntry>,
    #[serde(default)]
    pub constraints: Vec<PluginEntry>,
    #[serde(skip)]
    base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

impl PluginEntry {
    /// The configuration string the plugin's `configure` receives.
    pub fn config_text(&self) -> String {
        match &self.config {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    }
}

impl PluginsConfig {
    pub fn load(path: &Path) -> anyhow::Result<PluginsConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: PluginsConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(config)
    }

    /// Loads every plugin named, and makes the scheduler (if any) the engine's policy (the
    /// registry must be attached to the engine for that).
    pub fn apply(&self, registry: &Arc<PluginRegistry>) -> anyhow::Result<()> {
        let entries = self.scheduler.iter().map(|e| (PluginKind::Scheduler, e));
        let entries = entries
            .chain(self.samplers.iter().map(|e| (PluginKind::Sampler, e)))
            .chain(self.filters.iter().map(|e| (PluginKind::Filter, e)))
            .chain(self.constraints.iter().map(|e| (PluginKind::Constraint, e)));
        for (kind, entry) in entries {
            let path = self.base_dir.join(&entry.path);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {kind} plugin {}", path.display()))?;
            registry
                .install(kind, &entry.name, &bytes, entry.sha256.as_deref(), &entry.config_text(), "config")
                .with_context(|| format!("loading {kind} plugin `{}` from {}", entry.name, path.display()))?;
        }
        if let Some(entry) = &self.scheduler {
            registry.use_scheduler(&entry.name, "config")?;
        }
        Ok(())
    }
}
