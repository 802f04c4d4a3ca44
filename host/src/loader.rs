//! Loading what a model path names: a GGUF file, a Hugging Face directory, or a configuration
//! for dummy weights; and the tokenizer that comes with it. This is an edge of the program, so it
//! speaks `anyhow` and adds the path to every error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::model::arch::hf::HfConfig;
use crate::model::cpu::{CpuModel, CpuTensorParallelModel};
use crate::model::gguf::GgufFile;
use crate::model::sources::{DummySource, GgufSource, SafetensorsSource};
use crate::model::{Arch, ModelConfig, WeightSource};
use crate::tokenizer::{GgufTokenizerSpec, Tokenizer};

/// File name of the embedded default model, under `models/` of the repository.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    /// A `.gguf` file is GGUF; a directory is a Hugging Face checkpoint.
    Auto,
    Gguf,
    Safetensors,
    /// Random weights of the shape the path's config describes (GGUF metadata or config.json).
    Dummy,
}

pub struct LoadedModel {
    /// A short name for the API (`/v1/models`) and metrics.
    pub name: String,
    pub model: CpuModel,
    /// `None` only for dummy weights described by a bare `config.json`.
    pub tokenizer: Option<Arc<Tokenizer>>,
}

/// What a model path names, opened but with no weight read yet: its configuration, tokenizer and
/// the source its weights come from. A backend then loads the weights in its own form
/// (`load_cpu`, or `cuda::GpuModel::load` straight to the device).
pub struct ModelFiles {
    /// A short name for the API (`/v1/models`) and metrics.
    pub name: String,
    pub config: ModelConfig,
    /// `None` only for dummy weights described by a bare `config.json`.
    pub tokenizer: Option<Arc<Tokenizer>>,
    source: Box<dyn WeightSource>,
    path: PathBuf,
}

impl ModelFiles {
    pub fn source(&self) -> &dyn WeightSource {
        &*self.source
    }

    /// The weights in float32 on the host, for the CPU backend.
    pub fn load_cpu(self) -> anyhow::Result<LoadedModel> {
        let model = self.timed_load(1, || CpuModel::load(self.config.clone(), &*self.source, None))?;
        Ok(LoadedModel { name: self.name, model, tokenizer: self.tokenizer })
    }

    /// As `load_cpu`, one shard per rank of `world` tensor-parallel ranks, or why the model
    /// cannot be split so (`model::parallel`).
    pub fn load_cpu_split(&self, world: usize) -> anyhow::Result<CpuTensorParallelModel> {
        self.timed_load(world, || CpuTensorParallelModel::load(self.config.clone(), &*self.source, world))
    }

    /// `load`, the error naming the files and the time it took logged.
    fn timed_load<T>(&self, tensor_parallel_size: usize, load: impl FnOnce() -> Result<T, crate::model::ModelError>) -> anyhow::Result<T> {
        let started = Instant::now();
        let model = load().with_context(|| format!("loading weights from {}", self.path.display()))?;
        tracing::info!(
            model = %self.name,
            architecture = %self.config.architecture,
            parameters = self.config.num_parameters(),
            tensor_parallel_size,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(model)
    }
}

/// The default model's path: `$PAGEDSERVE_MODEL`, else `models/<DEFAULT_MODEL_FILE>` under the
/// current directory or under the repository this binary was built from.
pub fn default_model_path() -> PathBuf {
    if let Ok(path) = std::env::var("PAGEDSERVE_MODEL") {
        return PathBuf::from(path);
    }
    let local = Path::new("models").join(DEFAULT_MODEL_FILE);
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models").join(DEFAULT_MODEL_FILE)
}

/// Opens `path` and loads its weights for the CPU backend.
pub fn load(path: &Path, format: LoadFormat) -> anyhow::Result<LoadedModel> {
    open(path, format)?.load_cpu()
}

/// Reads what `path` names: configuration, tokenizer and weight source (no weights yet).
pub fn open(path: &Path, format: LoadFormat) -> anyhow::Result<ModelFiles> {
    let is_gguf = path.extension().is_some_and(|e| e == "gguf");
    let format = match format {
        LoadFormat::Auto if is_gguf => LoadFormat::Gguf,
        LoadFormat::Auto if path.is_dir() => LoadFormat::Safetensors,
        LoadFormat::Auto => bail!(
            "{}: not a .gguf file or a model directory (is the model fetched? run scripts/fetch-model.sh)",
            path.display()
        ),
        other => other,
    };
    let name = model_name(path);
    let (config, tokenizer, source): (ModelConfig, Option<Arc<Tokenizer>>, Box<dyn WeightSource>) = match format {
        LoadFormat::Gguf | LoadFormat::Dummy if is_gguf => {
            let file = GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?;
            let tokenizer = Tokenizer::from_gguf_spec(&GgufTokenizerSpec::from_gguf(&file)?)
                .with_context(|| format!("building the tokenizer of {}", path.display()))?;
            let source = GgufSource::from_file(file).with_context(|| path.display().to_string())?;
            let config = source.config()?;
            let source: Box<dyn WeightSource> = if format == LoadFormat::Dummy { Box::new(DummySource::for_model(0, &config)) } else { Box::new(source) };
            (config, Some(Arc::new(tokenizer)), source)
        }
        LoadFormat::Gguf => bail!("{}: --load-format gguf needs a .gguf file", path.display()),
        LoadFormat::Safetensors if is_gguf => bail!(
            "{}: --load-format safetensors needs a Hugging Face directory (config.json and *.safetensors); this is a GGUF file (--load-format gguf or auto)",
            path.display()
        ),
        LoadFormat::Safetensors | LoadFormat::Dummy => {
            let (dir, config_path) = if path.is_dir() {
                (path.to_path_buf(), path.join("config.json"))
            } else {
                (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf())
            };
            let json: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&config_path).with_context(|| format!("reading {}", config_path.display()))?,
            )
            .with_context(|| format!("parsing {}", config_path.display()))?;
            let hf = HfConfig::new(json);
            let config = Arch::from_hf(&hf)
                .and_then(|arch| arch.config_from_hf(&hf))
                .with_context(|| config_path.display().to_string())?;
            // The tokenizer first: a missing one should not cost a full weight load to find out.
            let tokenizer_json = dir.join("tokenizer.json");
            let tokenizer = if tokenizer_json.exists() {
                let tokenizer_config = dir.join("tokenizer_config.json");
                Some(Arc::new(
                    Tokenizer::from_file(&tokenizer_json, tokenizer_config.exists().then_some(tokenizer_config.as_path()))
                        .with_context(|| format!("loading {}", tokenizer_json.display()))?,
                ))
            } else if format == LoadFormat::Dummy {
                None
            } else {
                bail!("{}: tokenizer.json is missing", dir.display());
            };
            let source: Box<dyn WeightSource> = if format == LoadFormat::Dummy {
                Box::new(DummySource::for_model(0, &config))
            } else {
                Box::new(SafetensorsSource::open(&dir).with_context(|| format!("loading weights from {}", dir.display()))?)
            };
            (config, tokenizer, source)
        }
        LoadFormat::Auto => unreachable!("resolved above"),
    };
    Ok(ModelFiles { name, config, tokenizer, source, path: path.to_path_buf() })
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct.Q4_1`; a directory -> its name.
fn model_name(path: &Path) -> String {
    if path.is_dir() {
        // `.` or `..` have no name of their own; the directory they stand for does.
        let dir = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        return dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string());
    }
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        assert_eq!(model_name(Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf")), "SmolLM2-135M-Instruct.Q4_1");
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("Qwen2-0.5B");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        assert_eq!(model_name(&dir), "Qwen2-0.5B");
        assert_eq!(model_name(&dir.join("")), "Qwen2-0.5B", "trailing slash");
        assert_eq!(model_name(&dir.join("sub").join("..")), "Qwen2-0.5B", "`..` resolves to the directory");
        assert_eq!(model_name(Path::new("/")), "model");
    }

    #[test]
    fn errors_name_the_path_and_the_fix() {
        let err = load(Path::new("no/such/model.bin"), LoadFormat::Auto).err().unwrap().to_string();
        assert!(err.contains("no/such/model.bin") && err.contains("fetch-model.sh"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), LoadFormat::Gguf).err().unwrap().to_string();
        assert!(err.contains("needs a .gguf file"), "{err}");
        let err = format!("{:#}", load(dir.path(), LoadFormat::Safetensors).err().unwrap());
        assert!(err.contains("config.json"), "{err}");
        let gguf = dir.path().join("model.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        let err = load(&gguf, LoadFormat::Safetensors).err().unwrap().to_string();
        assert!(err.contains("needs a Hugging Face directory") && err.contains("GGUF file"), "{err}");
        std::fs::remove_file(&gguf).unwrap();
        // A missing tokenizer is reported before any weight is looked for.
        let config = serde_json::json!({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10});
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let err = format!("{:#}", load(dir.path(), LoadFormat::Safetensors).err().unwrap());
        assert!(err.contains("tokenizer.json is missing"), "{err}");
        let dummy = load(dir.path(), LoadFormat::Dummy).unwrap();
        assert!(dummy.tokenizer.is_none());
        assert_eq!(dummy.model.config().head_dim, 4);
    }
}
