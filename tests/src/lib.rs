//! Helpers shared by the end-to-end tests: locating the `pagedserve` binary, the default model and
//! the reference outputs.

use std::path::PathBuf;

use serde_json::Value;

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The `pagedserve` binary of the same build as this test (`$PAGEDSERVE_BIN` overrides).
/// `cargo test --workspace` builds it before running any test.
pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("PAGEDSERVE_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<this test> -> target/<profile>/pagedserve
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target dir").join("pagedserve");
    assert!(path.exists(), "{} is missing: build it with `cargo build --release`", path.display());
    path
}

/// The default model; a missing file fails the test with the command that fetches it.
pub fn model_path() -> PathBuf {
    let path = match std::env::var("PAGEDSERVE_MODEL") {
        Ok(path) => PathBuf::from(path),
        Err(_) => repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
    path
}

/// `shared/reference/smollm2_subset.json` (`$PAGEDSERVE_REFERENCE` overrides).
pub fn reference() -> Value {
    let path = match std::env::var("PAGEDSERVE_REFERENCE") {
        Ok(path) => PathBuf::from(path),
        Err(_) => repo_root().join("../shared/reference/smollm2_subset.json"),
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// Token ids from a JSON array.
pub fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("an array of ids").iter().map(|v| v.as_u64().expect("an id") as u32).collect()
}
