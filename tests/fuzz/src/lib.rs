//! What the fuzz targets share: the real tokenizers they run against, loaded once per process.
//! The default model (`models/`, fetched by `scripts/fetch-model.sh`) gives SmolLM2's tokenizer
//! and chat template; the architecture fixtures (`tests/fixtures/arch`) give the templates of the
//! other families.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use pagedserve::tokenizer::Tokenizer;

/// The repository root (this crate lives in `tests/fuzz`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The default model's tokenizer, as the server builds it (`$PAGEDSERVE_MODEL` overrides).
pub fn default_tokenizer() -> &'static Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = std::env::var("PAGEDSERVE_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        let files = pagedserve::loader::open(&path, pagedserve::loader::LoadFormat::Auto)
            .unwrap_or_else(|e| panic!("{}: {e:#} (run scripts/fetch-model.sh)", path.display()));
        files.tokenizer.expect("the default model has a tokenizer")
    })
}

/// Every tokenizer with a chat template: the default model's, then each architecture fixture's.
pub fn templated_tokenizers() -> &'static [Arc<Tokenizer>] {
    static ALL: OnceLock<Vec<Arc<Tokenizer>>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut all = vec![default_tokenizer().clone()];
        let arch = repo_root().join("tests/fixtures/arch");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&arch)
            .unwrap_or_else(|e| panic!("{}: {e}", arch.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("tokenizer_config.json").exists())
            .collect();
        dirs.sort();
        for dir in dirs {
            let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json")))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            if tokenizer.chat_template().is_some() {
                all.push(Arc::new(tokenizer));
            }
        }
        all
    })
}
