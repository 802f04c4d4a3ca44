//! The `pagedserve` command line: `serve` (the OpenAI-compatible HTTP server), `generate` (try
//! the model in a terminal), `check` (the GPU path against the CPU path) and `bench` (decode
//! throughput, the engine under load, GPU kernels, the cost of a scheduler call).

mod serve;
mod tensor_parallel;
#[cfg(feature = "tools")]
mod tools;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pagedserve::loader::{self, LoadFormat};
use pagedserve::runner::generate::{GenerateOptions, Generator};
use pagedserve::tokenizer::{ChatMessage, IncrementalDetokenizer};

#[derive(Parser)]
#[command(name = "pagedserve", version, about = "An LLM server with PagedAttention, continuous batching and Wasm plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Generate a continuation of one prompt, streaming it to the terminal (greedy).
    Generate(GenerateArgs),
    /// Benchmarks: `bench decode` (fixed batches), `bench serve` (the engine under load),
    /// `bench scheduler` (one scheduling-policy call, Wasm plugin against native) and `bench gpu`
    /// (GPU kernels and decode steps against the copy bandwidth).
    #[cfg(feature = "tools")]
    #[command(subcommand)]
    Bench(tools::BenchCommand),
    /// Check the GPU path against the CPU path: every kernel, the forward, greedy tokens.
    #[cfg(feature = "tools")]
    Check(tools::CheckArgs),
    /// Write the model's tokenizer (a GGUF's embedded one too) as Hugging Face files:
    /// `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template).
    #[cfg(feature = "tools")]
    ExportTokenizer(tools::ExportTokenizerArgs),
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long, env = "PAGEDSERVE_MODEL")]
    pub(crate) model: Option<PathBuf>,
    /// How to read `--model`; `dummy` makes random weights of its shape.
    #[arg(long, value_enum, default_value = "auto", env = "PAGEDSERVE_LOAD_FORMAT")]
    pub(crate) load_format: LoadFormat,
    /// Worker threads for the CPU forward [default: all cores]
    #[arg(long, env = "PAGEDSERVE_THREADS")]
    pub(crate) threads: Option<usize>,
    /// Quantize the weights as they load: `fp8` makes every dense layer projection E4M3 with a
    /// scale per output channel, as vLLM's `--quantization fp8` (GPU only, sm_89 or newer).
    #[arg(long, value_enum, env = "PAGEDSERVE_QUANTIZATION")]
    pub(crate) quantization: Option<Quantization>,
    /// Keep a GGUF's layer projections and head quantized on the GPU where they are stored in
    /// Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K, instead of dequantizing them to bf16 at load:
    /// products read the blocks, up to 4 rows with int8 dot products, 5 to 64 on the int8 tensor
    /// cores (Q6_K: dot products up to 8); more rows dequantize each weight into bf16 tiles for
    /// cuBLAS. About 3.5x less device memory than bf16 at 4 bits.
    #[arg(long, env = "PAGEDSERVE_KEEP_QUANTIZED")]
    pub(crate) keep_quantized: bool,
    /// With `--keep-quantized --load-format dummy`: the GGUF type the random projections are
    /// drawn in.
    #[arg(long, value_enum, default_value = "q4_k", env = "PAGEDSERVE_DUMMY_QUANT")]
    pub(crate) dummy_quant: DummyQuant,
    /// What the KV cache stores keys and values as: `auto` (float32 on the CPU, bfloat16 on the
    /// GPU) or `fp8` / `fp8_e4m3` (E4M3 at scale 1, as vLLM's `--kv-cache-dtype fp8` without
    /// calibrated scales: one byte a value, so twice bfloat16's tokens fit and a decode step
    /// reads half the bytes; on the GPU sm_89 or newer).
    #[arg(long, default_value = "auto", env = "PAGEDSERVE_KV_CACHE_DTYPE")]
    pub(crate) kv_cache_dtype: pagedserve::kv_cache::KvCacheDtype,
}

/// Weight quantization applied at load (`--quantization`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Quantization {
    Fp8,
}

/// The GGUF types random dummy weights can be drawn in (`--dummy-quant`): the kept ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DummyQuant {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    Q6K,
}

impl DummyQuant {
    pub(crate) fn ggml(self) -> pagedserve::model::gguf::GgmlType {
        use pagedserve::model::gguf::GgmlType;
        match self {
            DummyQuant::Q4_0 => GgmlType::Q4_0,
            DummyQuant::Q4_1 => GgmlType::Q4_1,
            DummyQuant::Q8_0 => GgmlType::Q8_0,
            DummyQuant::Q4K => GgmlType::Q4_K,
            DummyQuant::Q5K => GgmlType::Q5_K,
            DummyQuant::Q6K => GgmlType::Q6_K,
        }
    }
}

impl ModelArgs {
    /// The model's configuration, tokenizer and weight source, no weight read yet.
    pub(crate) fn open(&self) -> anyhow::Result<loader::ModelFiles> {
        if let Some(threads) = self.threads {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().context("setting up threads")?;
        }
        self.reopen()
    }

    /// The model's files opened again (after `open`, which also sets the CPU threads up).
    pub(crate) fn reopen(&self) -> anyhow::Result<loader::ModelFiles> {
        let path = self.model.clone().unwrap_or_else(loader::default_model_path);
        loader::open(&path, self.load_format)
    }

    /// The model with its weights on the host (the CPU backend's form).
    pub(crate) fn load(&self) -> anyhow::Result<loader::LoadedModel> {
        self.refuse_quantization("the CPU path")?;
        self.open()?.load_cpu()
    }

    /// An error naming `what` when `--quantization` is given: only the GPU quantizes.
    pub(crate) fn refuse_quantization(&self, what: &str) -> anyhow::Result<()> {
        if self.keep_quantized {
            anyhow::bail!("--keep-quantized is not available for {what}: the CPU dequantizes GGUF weights at load");
        }
        match self.quantization {
            Some(q) => {
                let name = clap::ValueEnum::to_possible_value(&q).map(|v| v.get_name().to_string()).unwrap_or_default();
                anyhow::bail!("--quantization {name} is not available for {what}: FP8 products run on the GPU (--device cuda)")
            }
            None => Ok(()),
        }
    }

    /// The model of `files` loaded straight to the GPU, quantized as `--quantization` says.
    pub(crate) fn load_gpu(&self, dev: std::sync::Arc<pagedserve::cuda::GpuDevice>, files: &loader::ModelFiles) -> anyhow::Result<pagedserve::cuda::GpuModel> {
        self.load_gpu_shard(dev, files, pagedserve::model::parallel::TensorParallel::SINGLE)
    }

    /// As `load_gpu`, one tensor-parallel rank's shard (the whole model at world 1).
    pub(crate) fn load_gpu_shard(
        &self,
        dev: std::sync::Arc<pagedserve::cuda::GpuDevice>,
        files: &loader::ModelFiles,
        parallel: pagedserve::model::parallel::TensorParallel,
    ) -> anyhow::Result<pagedserve::cuda::GpuModel> {
        let keep = self.keep_quantized.then(|| self.dummy_quant.ggml());
        let mut model = pagedserve::cuda::GpuModel::load_shard(dev, files.config.clone(), files.source(), keep, parallel)?;
        if self.quantization == Some(Quantization::Fp8) {
            model.quantize_fp8().context("--quantization fp8")?;
        }
        let memory: Vec<String> = model.bytes_by_format().iter().map(|(format, bytes)| format!("{format:?} {:.1} MB", *bytes as f64 / 1e6)).collect();
        tracing::info!(matrices = %memory.join(", "), "weights on the device by format");
        Ok(model)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    tensor_parallel: tensor_parallel::TensorParallelArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print the token ids after the text.
    #[arg(long)]
    print_ids: bool,
}


fn main() -> anyhow::Result<()> {
    // NVLink multicast (NVLS) stays off in NCCL (tensor parallelism, `cuda::collective`): a
    // program that uses it can take a shared host's GPUs out of service. Set before any thread.
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    let cli = Cli::parse();
    // The server logs each request at info; the terminal commands stay quiet.
    let default_filter = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Generate(args) => generate(args),
        #[cfg(feature = "tools")]
        Command::Bench(command) => tools::bench(command),
        #[cfg(feature = "tools")]
        Command::Check(args) => tools::check(args),
        #[cfg(feature = "tools")]
        Command::ExportTokenizer(args) => tools::export_tokenizer(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    args.model.refuse_quantization("the CPU path")?;
    let files = args.model.open()?;
    let tokenizer = files.tokenizer.clone().context("this model has no tokenizer")?;
    let tokenizer = &*tokenizer;
    let prompt = if args.chat {
        tokenizer.encode_chat(&[ChatMessage::new("user", &args.prompt)], true)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let weights = args.tensor_parallel.load_cpu(files)?;
    let max_len = (prompt.len() + args.max_tokens).min(weights.config().max_position_embeddings);
    let block_size = pagedserve::kv_cache::DEFAULT_BLOCK_SIZE;
    let cache = tensor_parallel::CacheShape { num_blocks: max_len.div_ceil(block_size), block_size, dtype: args.model.kv_cache_dtype };
    let mut generator = Generator::with_backend(weights.into_backend(cache));
    let options = GenerateOptions {
        max_new_tokens: max_len.saturating_sub(prompt.len()),
        stop_token_ids: if args.ignore_eos { Vec::new() } else { tokenizer.eos_token_ids().to_vec() },
        prefill_chunk: None,
    };
    let mut detokenizer = IncrementalDetokenizer::with_context(&prompt, tokenizer, true);
    let mut stdout = std::io::stdout().lock();
    let started = Instant::now();
    let mut first_token_at = None;
    let mut failure = None;
    let generated = generator.generate(std::slice::from_ref(&prompt), &options, |_, token| {
        first_token_at.get_or_insert_with(Instant::now);
        match detokenizer.step(tokenizer, token) {
            Ok(text) => {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
            Err(e) => failure = Some(e),
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    write!(stdout, "{}", detokenizer.finish(tokenizer)?)?;
    writeln!(stdout)?;
    if args.print_ids {
        writeln!(stdout, "{:?}", generated[0])?;
    }
    let n = generated[0].len();
    let decode_time = first_token_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    eprintln!(
        "[{} prompt tokens, {n} generated; first token after {:.0} ms, then {:.1} tokens/s]",
        prompt.len(),
        first_token_at.map_or(0.0, |t| (t - started).as_secs_f64() * 1e3),
        if n > 1 { (n - 1) as f64 / decode_time } else { 0.0 }
    );
    Ok(())
}

