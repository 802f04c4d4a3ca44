//! Shared by the host's integration tests: where the reference outputs and the default model are,
//! and the default model loaded once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use pagedserve::loader::{self, LoadFormat, LoadedModel};
use serde_json::Value;

/// `shared/reference/smollm2_subset.json`: `$PAGEDSERVE_REFERENCE`, else beside the repository.
pub fn reference_path() -> PathBuf {
    match std::env::var("PAGEDSERVE_REFERENCE") {
        Ok(path) => PathBuf::from(path),
        Err(_) => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference/smollm2_subset.json")),
    }
}

pub fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = reference_path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).expect("reference JSON")
    })
}

/// The default model; a missing file fails the test with the command that fetches it.
pub fn model_path() -> PathBuf {
    let path = loader::default_model_path();
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
    path
}

pub fn loaded_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| loader::load(&model_path(), LoadFormat::Auto).expect("loading the default model"))
}
