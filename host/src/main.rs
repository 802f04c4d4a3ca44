//! The `pagedserve` command line: `serve` (the OpenAI-compatible HTTP server), `generate` (try
//! the model in a terminal) and `bench` (CPU decode throughput).

mod serve;

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
    /// Measure CPU decode throughput at several batch sizes.
    Bench(BenchArgs),
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
}

impl ModelArgs {
    pub(crate) fn load(&self) -> anyhow::Result<loader::LoadedModel> {
        if let Some(threads) = self.threads {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().context("setting up threads")?;
        }
        let path = self.model.clone().unwrap_or_else(loader::default_model_path);
        loader::load(&path, self.load_format)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
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

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch_sizes: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated per sequence (the first is counted with the prefill, not the decode).
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn main() -> anyhow::Result<()> {
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
        Command::Bench(args) => bench(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer.as_ref().context("this model has no tokenizer")?;
    let prompt = if args.chat {
        tokenizer.encode_chat(&[ChatMessage::new("user", &args.prompt)], true)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let model = &loaded.model;
    let max_len = (prompt.len() + args.max_tokens).min(model.config().max_position_embeddings);
    let block_size = pagedserve::kv_cache::DEFAULT_BLOCK_SIZE;
    let mut generator = Generator::new(model, max_len.div_ceil(block_size), block_size);
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

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.gen_len >= 2, "--gen-len must be at least 2");
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let vocab = model.config().vocab_size as u32;
    let block_size = pagedserve::kv_cache::DEFAULT_BLOCK_SIZE;
    println!(
        "model {} ({:.1}M parameters), {} threads, prompt {} tokens, {} generated per sequence, median of {}",
        loaded.name,
        model.config().num_parameters() as f64 / 1e6,
        rayon::current_num_threads(),
        args.prompt_len,
        args.gen_len,
        args.repeats
    );
    println!("{:>6} {:>12} {:>16} {:>14}", "batch", "prefill s", "decode tok/s", "ms/step");
    for &batch in &args.batch_sizes {
        // Distinct deterministic prompts so no two sequences are alike.
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|b| (0..args.prompt_len).map(|i| ((b * 7919 + i * 104_729) as u32 % (vocab - 100)) + 100).collect())
            .collect();
        let blocks = batch * (args.prompt_len + args.gen_len).div_ceil(block_size);
        let mut runs = Vec::new();
        for _ in 0..args.repeats.max(1) {
            let mut generator = Generator::new(model, blocks, block_size);
            let options = GenerateOptions { max_new_tokens: args.gen_len, stop_token_ids: Vec::new(), prefill_chunk: None };
            let started = Instant::now();
            let mut first_token_at = None;
            let mut tokens = 0usize;
            generator.generate(&prompts, &options, |_, _| {
                tokens += 1;
                if tokens == batch {
                    first_token_at = Some(Instant::now());
                }
            })?;
            let prefill = first_token_at.expect("every sequence made a token") - started;
            let decode = first_token_at.unwrap().elapsed().as_secs_f64();
            let decode_tokens = batch * (args.gen_len - 1);
            runs.push((prefill.as_secs_f64(), decode_tokens as f64 / decode, decode / (args.gen_len - 1) as f64));
        }
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (prefill, tokens_per_s, step) = runs[runs.len() / 2];
        println!("{batch:>6} {prefill:>12.3} {tokens_per_s:>16.1} {:>14.1}", step * 1e3);
    }
    Ok(())
}
