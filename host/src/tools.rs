//! The `bench`, `check` and `export-tokenizer` subcommands (the `tools` feature, on by default):
//! benchmarks the binary runs on itself, the GPU self-checks, over `pagedserve::bench`, and the
//! export of a model's tokenizer as Hugging Face files.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use pagedserve::kv_cache::KvCacheDtype;
use pagedserve::loader::LoadFormat;
use pagedserve::runner::generate::{GenerateOptions, Generator};

use crate::ModelArgs;

/// Runs one `bench` subcommand.
pub(crate) fn bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Decode(args) => bench_decode(args),
        BenchCommand::Serve(args) => bench_serve(args),
        BenchCommand::Gpu(args) => bench_gpu(args),
        BenchCommand::Scheduler(args) => bench_scheduler(args),
    }
}

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Decode throughput of the model at fixed batch sizes.
    Decode(BenchArgs),
    /// The serving engine under a ShareGPT-like load from closed-loop clients.
    Serve(BenchServeArgs),
    /// GPU kernels and decode steps against the copy bandwidth measured in the same run.
    Gpu(BenchGpuArgs),
    /// The cost of one scheduler call with a large queue: a Wasm scheduler plugin against native FCFS.
    Scheduler(BenchSchedulerArgs),
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Only `cuda` has anything to check against the CPU reference.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// HF transformers' reference outputs (smollm2_subset.json) for the greedy checks
    /// [default: ../shared/reference/smollm2_subset.json beside the repository, if present]
    #[arg(long, env = "PAGEDSERVE_REFERENCE")]
    reference: Option<PathBuf>,
    /// Only compile the kernels with NVRTC for this architecture (e.g. sm_90); needs no GPU.
    #[arg(long)]
    compile_only: Option<String>,
}

#[derive(Args)]
pub(crate) struct BenchGpuArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Batch sizes for the default model's decode step.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    batch_sizes: Vec<usize>,
    /// Context length (cached positions) of each decoding sequence.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Also run the Llama-3.1-8B-shaped dummy model (16 GB of weights).
    #[arg(long)]
    llama_8b: bool,
    /// Also the FP8 paths (sm_89 on): the default model with FP8 projections, and with
    /// `--llama-8b` the 8B products and decode steps in FP8.
    #[arg(long)]
    fp8: bool,
    /// With `--llama-8b`, also the 8B decode steps with dummy GGUF weights of this type kept
    /// quantized (repeatable: `--ggml q4_k --ggml q6_k`).
    #[arg(long, value_enum)]
    ggml: Vec<crate::DummyQuant>,
    /// Only the copy bandwidth and the attention kernels (no model is loaded).
    #[arg(long)]
    attention_only: bool,
    /// Only the copy bandwidth and the 8B decode steps of the quantized formats asked for
    /// (`--fp8`, `--ggml`), each beside bf16.
    #[arg(long)]
    quantized_only: bool,
    /// Only the copy bandwidth and the 8B decode step at each `--batch-sizes` and `--context`, in bf16
    /// (and FP8 with `--fp8`), over a cache of `--kv-cache-dtype`: where an eager step's time goes
    /// by kind of launch, then the step through its CUDA graph. The throughput regime's view
    /// (batches of hundreds).
    #[arg(long)]
    breakdown_8b_only: bool,
    /// With `--breakdown-8b-only`: also the graph step without the attention kernels and without
    /// the products, to see what each costs inside the graph (those steps compute nothing useful).
    #[arg(long)]
    omissions: bool,
    /// With `--breakdown-8b-only`: capture the graphs for sequences of up to this many positions
    /// (the server captures them for `--max-model-len`, so a one-row graph plans its attention's
    /// split for that, most of its splits empty at shorter contexts); default `--context` + 16.
    #[arg(long)]
    graph_context: Option<usize>,
    /// Only the copy bandwidth and the 8B layout's decode attention at each `--batch-sizes` and
    /// `--sweep-contexts`, even and mixed, at each `--sweep-splits` beside the planned split.
    #[arg(long)]
    attention_sweep: bool,
    /// Contexts of `--attention-sweep`.
    #[arg(long, value_delimiter = ',', default_value = "128,256,512,1024,2048")]
    sweep_contexts: Vec<usize>,
    /// Split counts `--attention-sweep` tries beside the planned one.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,6,8,12,16")]
    sweep_splits: Vec<usize>,
    /// Cache block sizes (positions a block, `serve --block-size`) `--attention-sweep` runs at.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    sweep_block_sizes: Vec<usize>,
}

#[derive(Args)]
pub(crate) struct BenchSchedulerArgs {
    /// The scheduler component to measure.
    #[arg(long, default_value = "plugins/dist/fcfs.wasm")]
    plugin: PathBuf,
    #[arg(long, default_value_t = 256)]
    running: usize,
    #[arg(long, default_value_t = 1000)]
    waiting: usize,
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct BenchServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    tensor_parallel: crate::tensor_parallel::TensorParallelArgs,
    #[arg(long, default_value_t = 64)]
    num_requests: usize,
    /// Clients, each sending its next request when the previous one finishes.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Prompt pacing at light load, as `serve --light-load-step-tokens` (0: off).
    #[arg(long, default_value_t = 0)]
    light_load_step_tokens: usize,
    #[arg(long, default_value_t = 2048)]
    max_model_len: usize,
    /// KV-cache blocks of 16 tokens [default: enough for every client at the longest length]
    #[arg(long)]
    num_kv_blocks: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the workload (prompt ids and output lengths) as JSON, for baselines to replay.
    #[arg(long)]
    dump_workload: Option<PathBuf>,
    /// Schedule with this Wasm scheduler component instead of the native FCFS policy.
    #[arg(long)]
    scheduler_plugin: Option<PathBuf>,
    /// With --scheduler-plugin: swap between it and native FCFS every N engine steps, and report
    /// the step times around the swaps.
    #[arg(long)]
    swap_every: Option<usize>,
    /// Run the model on the GPU (with decode CUDA graphs, as `serve` does) instead of the CPU.
    #[arg(long)]
    cuda: bool,
    /// Run no model: each row gets a pseudo-random token at once (no weights are loaded; the
    /// model's configuration and tokenizer are). The step phases are then the engine's own host
    /// cost per step (scheduling, bookkeeping, detokenizing, events): what a GPU waits out between
    /// two forwards.
    #[arg(long, conflicts_with = "cuda")]
    host_only: bool,
    /// As `serve --async-scheduling`: pipeline the engine's steps (`auto`: on with the GPU).
    #[arg(long, value_enum, default_value = "auto")]
    async_scheduling: crate::serve::AsyncScheduling,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
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

fn bench_decode(args: BenchArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
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
        let r = pagedserve::bench::decode::run(model, batch, args.prompt_len, args.gen_len, args.repeats)?;
        println!(
            "{:>6} {:>12.3} {:>16.1} {:>14.1}",
            r.batch,
            r.prefill_seconds,
            r.decode_tokens_per_second,
            r.step_seconds * 1e3
        );
    }
    Ok(())
}

fn bench_scheduler(args: BenchSchedulerArgs) -> anyhow::Result<()> {
    let component = std::fs::read(&args.plugin)
        .with_context(|| format!("reading {} (build the plugins with scripts/build-plugins.sh)", args.plugin.display()))?;
    let r = pagedserve::bench::scheduler::run(&component, args.running, args.waiting, args.iterations)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "scheduler call, {} running + {} waiting sequences, median of {} calls ({})",
        r.running,
        r.waiting,
        r.iterations,
        args.plugin.display()
    );
    println!("wasm plugin rank      {:>10.1} us  (p99 {:.1} us)", r.wasm_median_us, r.wasm_p99_us);
    println!("native fcfs rank      {:>10.1} us", r.native_fcfs_median_us);
    println!("ranking validation    {:>10.1} us  (paid by every policy)", r.validate_median_us);
    Ok(())
}

fn bench_serve(args: BenchServeArgs) -> anyhow::Result<()> {
    use pagedserve::bench::serve;
    let files = args.model.open()?;
    let tokenizer = files.tokenizer.clone().context("this model has no tokenizer")?;
    let block_size = pagedserve::kv_cache::DEFAULT_BLOCK_SIZE;
    let num_blocks = args.num_kv_blocks.unwrap_or(args.concurrency * args.max_model_len.div_ceil(block_size));
    if let Some(path) = &args.dump_workload {
        let workload = serve::sharegpt_like_workload(args.num_requests, files.config.vocab_size, args.max_model_len, args.seed);
        std::fs::write(path, serde_json::to_vec(&workload)?).with_context(|| path.display().to_string())?;
    }
    let backend: Box<dyn pagedserve::runner::ModelBackend> = if args.host_only {
        anyhow::ensure!(
            args.tensor_parallel.tensor_parallel_size == 1 && args.model.quantization.is_none() && !args.model.keep_quantized,
            "--host-only loads no weights: --tensor-parallel-size, --quantization and --keep-quantized have nothing to act on"
        );
        Box::new(pagedserve::runner::HostOnlyBackend::new(files.config.clone(), num_blocks, block_size, args.seed))
    } else if args.cuda {
        let config = files.config.clone();
        let cache = crate::tensor_parallel::CacheShape { num_blocks, block_size, dtype: args.model.kv_cache_dtype };
        args.tensor_parallel.load_gpu(&args.model, &files)?.into_backend(&config, cache, true, args.max_num_seqs, args.max_model_len)?
    } else {
        args.model.refuse_quantization("the CPU backend")?;
        args.tensor_parallel.load_cpu(files)?.into_backend(crate::tensor_parallel::CacheShape { num_blocks, block_size, dtype: args.model.kv_cache_dtype })
    };
    let (backend, async_scheduling) = args.async_scheduling.apply(backend);
    let options = serve::ServeOptions {
        num_requests: args.num_requests,
        concurrency: args.concurrency,
        scheduler: pagedserve::sched::SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            light_load_step_tokens: args.light_load_step_tokens,
        },
        max_model_len: args.max_model_len,
        seed: args.seed,
        async_scheduling,
    };
    // The registry must outlive the run: the Wasm policy calls into its slot.
    let mut _registry = None;
    let mut policies: Vec<Box<dyn pagedserve::sched::SchedulingPolicy>> = Vec::new();
    if let Some(path) = &args.scheduler_plugin {
        use pagedserve::plugin::{PluginKind, PluginLimits, PluginRegistry, PluginRuntime, WasmScheduler};
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let registry = PluginRegistry::new(
            PluginRuntime::new(PluginLimits::default())?,
            std::sync::Arc::new(pagedserve::metrics::Metrics::new("bench")),
        );
        registry.install(PluginKind::Scheduler, "bench", &bytes, None, "", "bench")?;
        let slot = registry.slot(PluginKind::Scheduler, "bench").context("installed plugin")?;
        _registry = Some(registry);
        policies.push(Box::new(WasmScheduler::new(slot, Box::new(pagedserve::sched::Fcfs))));
    }
    if policies.is_empty() || args.swap_every.is_some() {
        policies.push(pagedserve::sched::native_policy("fcfs").context("built-in policy")?);
    }
    let (r, swaps) = serve::run_with_swaps(backend, tokenizer, policies, args.swap_every, &options)?;
    if let Some(s) = &swaps {
        println!(
            "{} swaps: each took at most {:.1} us; median step {:.1} ms, longest step after a swap {:.1} ms, longest other step {:.1} ms",
            s.swaps, s.max_swap_us, s.median_step_ms, s.max_step_after_swap_ms, s.max_other_step_ms
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} requests, {} clients, {} threads: {:.1} s, {} prompt + {} output tokens",
        r.requests,
        r.concurrency,
        rayon::current_num_threads(),
        r.seconds,
        r.prompt_tokens,
        r.output_tokens
    );
    println!("output throughput     {:>10.1} tokens/s", r.output_tokens_per_second);
    println!("total throughput      {:>10.1} tokens/s", r.total_tokens_per_second);
    println!("median TTFT           {:>10.1} ms", r.median_ttft_ms);
    println!("median TPOT           {:>10.1} ms", r.median_tpot_ms);
    println!("preemptions           {:>10}", r.preemptions);
    println!("KV-cache occupancy    {:>10.1} %  (allocated slots holding tokens)", r.kv_occupancy * 100.0);
    println!("engine steps          {:>10}", r.steps);
    let phases: Vec<String> = r.mean_phase_ms.iter().map(|(phase, ms)| format!("{phase} {ms:.3}")).collect();
    println!("mean ms per step      {:>10}", phases.join(", "));
    println!("scheduling policy     {:>10}  ({} faults)", r.policy, r.policy_faults);
    Ok(())
}

/// The top-1/top-2 logit margin under which a greedy divergence of a GGUF model kept quantized
/// (`--keep-quantized`, int8 inputs) from HF's tokens is a near-tie (bf16: 0.1).
const KEPT_NEAR_TIE: f64 = 0.5;

pub(crate) fn check(args: CheckArgs) -> anyhow::Result<()> {
    use pagedserve::bench::check;
    use pagedserve::cuda::GpuDevice;
    anyhow::ensure!(args.device == "cuda", "`--device {}`: only cuda is checked against the CPU path", args.device);
    if let Some(arch) = &args.compile_only {
        pagedserve::cuda::kernels::compile_all(arch)?;
        println!("every kernel module compiles for {arch}");
        return Ok(());
    }
    args.model
        .refuse_quantization("`check`, which checks FP8 itself")?;
    let dev = GpuDevice::new(0)?;
    println!("device: {} ({}, {} SMs)", dev.name, dev.arch, dev.num_sms);
    let mut rows = check::kernel_checks(&dev)?;
    rows.extend(check::gemv_checks(&dev)?);
    rows.extend(pagedserve::bench::check_quant::fp8_checks(&dev)?);
    rows.extend(pagedserve::bench::check_quant::ggml_checks(&dev)?);
    rows.extend(check::sampling_checks(&dev)?);
    rows.extend(check::fp8_cache_checks(&dev)?);
    let files = args.model.open()?;
    // Dummy weights are drawn on the device by the direct path: nothing to compare with.
    let direct = (!files.source().is_dummy()).then(|| pagedserve::cuda::GpuModel::load(dev.clone(), files.config.clone(), files.source()));
    let loaded = files.load_cpu()?;
    let reference_path = args.reference.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/smollm2_subset.json")
    });
    let reference: Option<serde_json::Value> =
        std::fs::read_to_string(&reference_path).ok().and_then(|text| serde_json::from_str(&text).ok());
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()).unwrap_or_default()
    };
    let prompts: Vec<Vec<u32>> = match &reference {
        Some(r) => r["greedy"]["prompts"].as_array().unwrap().iter().map(|p| ids(&p["prompt_ids"])).collect(),
        None => pagedserve::bench::decode::synthetic_prompts(4, 23, loaded.model.config().vocab_size),
    };
    if let Some(direct) = direct {
        rows.push(check::check_direct_load(&dev, direct?, &loaded.model, &prompts)?);
    }
    rows.extend(check::check_forward(&dev, &loaded.model, &prompts, KvCacheDtype::Auto)?);
    rows.extend(check::check_forward_small_batch(&dev, &loaded.model, &prompts, KvCacheDtype::Auto)?);
    rows.extend(check::check_forward_split_k(&dev, &loaded.model, &prompts)?);
    if dev.compute_capability() >= 89 {
        rows.extend(check::check_forward(&dev, &loaded.model, &prompts, KvCacheDtype::Fp8E4M3)?);
        rows.extend(check::check_forward_small_batch(&dev, &loaded.model, &prompts, KvCacheDtype::Fp8E4M3)?);
    }
    rows.extend(pagedserve::bench::check_quant::check_forward_fp8(&dev, &loaded.model, &prompts)?);
    // A GGUF file's own blocks kept on the device (`--keep-quantized`), against the CPU reading
    // the same file.
    let load_kept = || -> anyhow::Result<Option<pagedserve::cuda::GpuModel>> {
        let files = args.model.reopen()?;
        if files.source().is_dummy() {
            return Ok(None);
        }
        let keep = Some(pagedserve::model::gguf::GgmlType::Q4_K);
        let model = pagedserve::cuda::GpuModel::load_with(dev.clone(), files.config.clone(), files.source(), keep)?;
        Ok(model.bytes_by_format().iter().any(|(f, _)| matches!(f, pagedserve::cuda::launch::WeightFormat::Ggml(_))).then_some(model))
    };
    if let Some(kept) = load_kept()? {
        rows.extend(pagedserve::bench::check_quant::check_forward_kept(kept, &loaded.model, &prompts)?);
    }
    rows.push(check::check_graphs(&dev, &loaded.model, &prompts, 12, None)?);
    rows.push(check::check_graphs(&dev, &loaded.model, &prompts, 12, Some(4096))?);
    rows.extend(check::check_tensor_parallel_nccl(&dev, &loaded.model, &prompts, 12)?);
    if let Some(tokenizer) = loaded.tokenizer.clone() {
        rows.push(check::check_engine_graphs(&dev, &loaded.model, tokenizer, &prompts, 24)?);
    }
    match &reference {
        Some(r) if loaded.name.starts_with("SmolLM2-135M") => {
            for p in r["greedy"]["prompts"].as_array().unwrap() {
                let margins: Vec<f64> =
                    p["top1_top2_logit_margin"].as_array().unwrap().iter().filter_map(|m| m.as_f64()).collect();
                let mut row =
                    check::check_greedy(&dev, &loaded.model, &ids(&p["prompt_ids"]), &ids(&p["new_ids"]), Some(&margins), 0.1)?;
                row.name = format!("greedy vs HF ({})", p["kind"].as_str().unwrap_or(""));
                rows.push(row);
                if let Some(kept) = load_kept()? {
                    // Its int8 inputs move the logits by a few hundredths of their spread (see
                    // `check_forward_kept`): a divergence is a near-tie under half a logit (seen: one
                    // prompt of four at a margin of 0.22, H200).
                    let mut row = check::check_greedy_of(kept, &ids(&p["prompt_ids"]), &ids(&p["new_ids"]), Some(&margins), KEPT_NEAR_TIE)?;
                    row.name = format!("greedy vs HF, GGUF kept ({})", p["kind"].as_str().unwrap_or(""));
                    rows.push(row);
                }
            }
        }
        _ if args.model.load_format == LoadFormat::Dummy => {
            // Random weights give near-uniform logits: greedy tokens are all near-ties.
            println!("(greedy checks skipped: dummy weights have no meaningful argmax)");
        }
        _ => {
            // No reference for this model: the CPU path's greedy tokens are the expectation.
            for prompt in &prompts {
                let expected = Generator::new(&loaded.model, 64, 16)
                    .generate(std::slice::from_ref(prompt), &GenerateOptions { max_new_tokens: 16, stop_token_ids: vec![], prefill_chunk: None }, |_, _| {})?
                    .remove(0);
                let mut row = check::check_greedy(&dev, &loaded.model, prompt, &expected, None, 0.0)?;
                row.name = "greedy vs CPU".into();
                rows.push(row);
            }
        }
    }
    if !check::print_table(&rows) {
        std::process::exit(1);
    }
    Ok(())
}

fn bench_gpu(args: BenchGpuArgs) -> anyhow::Result<()> {
    use pagedserve::bench::gpu;
    use pagedserve::cuda::{GpuBackend, GpuDevice, GpuModel};
    // A block of no positions would divide by zero in the sweep's block tables (`serve` refuses it too).
    anyhow::ensure!(!args.sweep_block_sizes.contains(&0), "--sweep-block-sizes takes block sizes of at least one position");
    let dev = GpuDevice::new(0)?;
    println!("device: {} ({}, {} SMs, memory peak {:.0} GB/s)", dev.name, dev.arch, dev.num_sms, dev.peak_memory_gbps);
    let copy = gpu::copy_bandwidth(&dev, 1 << 30)?;
    println!("copy bandwidth (read + write)        {copy:>10.0} GB/s");
    if args.attention_sweep {
        return Ok(gpu::print_attention_sweep(&dev, copy, &args.batch_sizes, &args.sweep_contexts, &args.sweep_splits, &args.sweep_block_sizes)?);
    }
    if args.quantized_only {
        return print_quantized_8b_steps(&dev, copy, &args, true);
    }
    if args.breakdown_8b_only {
        if dev.skinny.is_some() {
            for tiles in pagedserve::cuda::skinny::TILES {
                for silu in [false, true] {
                    gpu::print_kernel_resources(&dev, &pagedserve::cuda::skinny::kernel_name(tiles, silu), "")?;
                }
            }
        }
        let max_batch = args.batch_sizes.iter().copied().max().unwrap_or(1);
        let formats = [Some(gpu::DummyWeights::Bf16), args.fp8.then_some(gpu::DummyWeights::Fp8)];
        for weights in formats.into_iter().flatten() {
            let cache = args.model.kv_cache_dtype;
            let mut big = gpu::llama_8b_backend(&dev, max_batch, args.context + 16, weights, cache)?;
            for &batch in &args.batch_sizes {
                gpu::print_step_breakdown(&mut big, batch, args.context, &format!("Llama-3.1-8B {weights:?}, {} cache", cache.name()))?;
            }
            let graph_context = args.graph_context.unwrap_or(args.context + 16).max(args.context + 1);
            big.capture_decode_graphs(max_batch, graph_context)?;
            let mut full = Vec::new();
            for &batch in &args.batch_sizes {
                let ms = gpu::decode_step_ms(&mut big, batch, args.context, 10, true)?;
                println!(
                    "Llama-3.1-8B dummy decode {weights:?} {} cache b{batch:<4} c{:<5} graphs {ms:>8.3} ms  {:>8.0} tok/s (graphs for {graph_context} positions)",
                    cache.name(),
                    args.context,
                    batch as f64 / ms * 1e3
                );
                full.push((batch, ms));
            }
            if args.omissions {
                gpu::print_graph_omissions(&mut big, &full, args.context, max_batch, graph_context)?;
            }
            // The served step: the graph, then the device sampler (greedy, as the load client
            // asks, and T 0.8 top-p 0.95), its uploads and its download; the step above ends in
            // `argmax_rows` instead, one block a row.
            let greedy = pagedserve::sampling::SamplingParams { temperature: 0.0, ..Default::default() };
            let random = pagedserve::sampling::SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(1), ..Default::default() };
            for &batch in &args.batch_sizes {
                let mut served = |params| gpu::serving_step_ms(&mut big, batch, args.context, 10, true, gpu::StepSampling::Device, params);
                let (greedy_ms, random_ms) = (served(&greedy)?, served(&random)?);
                println!("Llama-3.1-8B served decode step {weights:?} b{batch:<4} c{:<5} greedy {greedy_ms:>8.3} ms | T 0.8 top-p 0.95 {random_ms:>8.3} ms", args.context);
            }
        }
        // Each product alone at each batch size, in a graph (the GEMV at one row, the skinny
        // kernel at 2 to 64, against cuBLAS).
        for &batch in args.batch_sizes.iter().filter(|&&b| dev.skinny.as_ref().is_some_and(|s| s.rows.contains(&b))) {
            gpu::print_gemv_vs_cublas(&dev, "Llama-3.1-8B", batch, &gpu::LLAMA_8B_PRODUCTS)?;
        }
        if args.batch_sizes.contains(&1) {
            gpu::print_gemv_vs_cublas(&dev, "Llama-3.1-8B", 1, &gpu::LLAMA_8B_PRODUCTS)?;
            if args.fp8 {
                gpu::print_fp8_products(&dev, "Llama-3.1-8B", 1, &gpu::LLAMA_8B_PRODUCTS[..4])?;
            }
        }
        return Ok(());
    }
    gpu::print_attention_decode(&dev, copy)?;
    gpu::print_attention_prefill(&dev)?;
    if args.attention_only {
        return Ok(());
    }
    let loaded = args.model.load()?;
    let max_batch = args.batch_sizes.iter().copied().max().unwrap_or(1);
    let mut backend = GpuBackend::new(
        GpuModel::from_cpu(dev.clone(), &loaded.model)?,
        max_batch * args.context.div_ceil(16),
        16,
    )?;
    let mut eager = Vec::new();
    for &batch in &args.batch_sizes {
        eager.push(gpu::decode_step_ms(&mut backend, batch, args.context, 30, false)?);
    }
    gpu::print_gemv_vs_cublas(&dev, "SmolLM2", 1, &gpu::SMOLLM2_PRODUCTS)?;
    // Where an eager step's time goes: batch 1 on the fused GEMV path and on cuBLAS, then the
    // largest batch asked for up to 64 (cuBLAS, whatever the setting).
    gpu::print_step_breakdown(&mut backend, 1, args.context, "fused GEMV path")?;
    backend.set_gemv_enabled(false);
    gpu::print_step_breakdown(&mut backend, 1, args.context, "cuBLAS path")?;
    let cublas_b1 = gpu::decode_step_ms(&mut backend, 1, args.context, 30, false)?;
    backend.capture_decode_graphs(1, args.context + 16)?;
    let cublas_b1_graph = gpu::decode_step_ms(&mut backend, 1, args.context, 30, true)?;
    backend.set_gemv_enabled(true);
    if let Some(&big) = args.batch_sizes.iter().filter(|&&b| b > 8 && b <= 64).max() {
        gpu::print_step_breakdown(&mut backend, big, args.context, "cuBLAS")?;
    }
    let captured = backend.capture_decode_graphs(max_batch, args.context + 16)?;
    println!("captured {captured} decode graphs");
    println!(
        "{} decode step b1    c{}  cuBLAS path:   without graphs {:>8.3} ms {:>9.0} tok/s | with graphs {:>8.3} ms {:>9.0} tok/s",
        loaded.name,
        args.context,
        cublas_b1,
        1e3 / cublas_b1,
        cublas_b1_graph,
        1e3 / cublas_b1_graph
    );
    for (&batch, &ms) in args.batch_sizes.iter().zip(&eager) {
        let graph_ms = gpu::decode_step_ms(&mut backend, batch, args.context, 30, true)?;
        println!(
            "{} decode step b{batch:<4} c{}  without graphs {:>8.3} ms {:>9.0} tok/s | with graphs {:>8.3} ms {:>9.0} tok/s",
            loaded.name,
            args.context,
            ms,
            batch as f64 / (ms * 1e-3),
            graph_ms,
            batch as f64 / (graph_ms * 1e-3)
        );
    }
    // Programmatic dependent launches (sm_90): the same graphs captured with each scope, twice;
    // then the scope the run started with (the default or `PAGEDSERVE_PDL`) again.
    let initial_pdl = dev.pdl_scope();
    if dev.pdl_supported() {
        use pagedserve::cuda::PdlScope;
        for _ in 0..2 {
            for scope in [PdlScope::Off, PdlScope::All, PdlScope::AllButGemv, PdlScope::GemvOnly, PdlScope::GemvAndMerge, PdlScope::GemvAndAttention] {
                dev.set_pdl_scope(scope);
                backend.capture_decode_graphs(max_batch, args.context + 16)?;
                let times: Vec<String> = args
                    .batch_sizes
                    .iter()
                    .map(|&batch| gpu::decode_step_ms(&mut backend, batch, args.context, 30, true).map(|ms| format!("b{batch} {ms:.3} ms")))
                    .collect::<Result<_, _>>()?;
                println!("{} decode step with graphs, PDL {:<10}: {}", loaded.name, format!("{scope:?}"), times.join("  "));
            }
        }
        dev.set_pdl_scope(initial_pdl);
        backend.capture_decode_graphs(max_batch, args.context + 16)?;
    }
    // The serving path: logits to the host and the native samplers, against sampling on the
    // device, each with and without graphs.
    let params = pagedserve::sampling::SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(1), ..Default::default() };
    println!("serving decode step, sampling T 0.8 top-p 0.95 (ms; host = logits to host + CPU sampler):");
    println!("{:>6} {:>14} {:>14} {:>14} {:>14}", "batch", "host eager", "device eager", "host graphs", "device graphs");
    for &batch in &args.batch_sizes {
        let mut times = Vec::new();
        for graphs in [false, true] {
            for sampling in [gpu::StepSampling::Host, gpu::StepSampling::Device] {
                // The host sampler sorts each row's vocabulary for top-p: fewer repeats.
                let repeats = if sampling == gpu::StepSampling::Host { 10 } else { 30 };
                times.push(gpu::serving_step_ms(&mut backend, batch, args.context, repeats, graphs, sampling, &params)?);
            }
        }
        println!("{:>6} {:>14.3} {:>14.3} {:>14.3} {:>14.3}", batch, times[0], times[1], times[2], times[3]);
    }
    if args.fp8 {
        let mut model = GpuModel::from_cpu(dev.clone(), &loaded.model)?;
        model.quantize_fp8()?;
        let mut fp8 = GpuBackend::new(model, max_batch * args.context.div_ceil(16), 16)?;
        fp8.capture_decode_graphs(max_batch, args.context + 16)?;
        for &batch in &args.batch_sizes {
            let (eager_ms, graph_ms) = (
                gpu::decode_step_ms(&mut fp8, batch, args.context, 30, false)?,
                gpu::decode_step_ms(&mut fp8, batch, args.context, 30, true)?,
            );
            println!("{} FP8 decode step b{batch:<4} c{}  without graphs {eager_ms:>8.3} ms | with graphs {graph_ms:>8.3} ms", loaded.name, args.context);
        }
        gpu::print_step_breakdown(&mut fp8, 1, args.context, "FP8, fused GEMV path")?;
    }
    if args.llama_8b {
        drop(backend);
        // The 8B products at the batch sizes of one client and of a few tens, where a step is a
        // weight stream: each against cuBLAS, with its share of the copy rate.
        for m in [1, 2, 4, 8, 32] {
            gpu::print_gemv_vs_cublas(&dev, "Llama-3.1-8B", m, &gpu::LLAMA_8B_PRODUCTS)?;
        }
        if args.fp8 {
            for m in [1, 2, 3, 4, 8, 16, 64, 256] {
                gpu::print_fp8_products(&dev, "Llama-3.1-8B", m, &gpu::LLAMA_8B_PRODUCTS[..4])?;
            }
        }
        print_quantized_8b_steps(&dev, copy, &args, false)?;
        let (batch, context) = (64, 2048);
        let mut big = gpu::llama_8b_backend(&dev, batch, context, gpu::DummyWeights::Bf16, KvCacheDtype::Auto)?;
        let c = big.model().config().clone();
        let floor = |batch: usize, context: usize| {
            let kv_bytes = 2 * c.num_hidden_layers * batch * context * c.num_key_value_heads * c.head_dim * 2;
            (big.model().weight_bytes() + kv_bytes) as f64 / (copy * 1e9) * 1e3
        };
        let floors: Vec<(usize, usize, f64)> = [(1, 512), (32, 512), (64, 2048)].iter().map(|&(b, ctx)| (b, ctx, floor(b, ctx))).collect();
        gpu::print_step_breakdown(&mut big, 1, 512, "Llama-3.1-8B")?;
        // Graphs on each product path (cuBLAS for every batch, or the GEMV where it is preferred),
        // with each scope of programmatic dependent launches, twice in turn.
        use pagedserve::cuda::PdlScope;
        let pdl_supported = dev.pdl_supported();
        for round in 0..2 {
            for (label, gemv, scope) in [
                ("cuBLAS", false, PdlScope::Off),
                ("cuBLAS+PDL", false, PdlScope::All),
                ("GEMV", true, PdlScope::Off),
                ("GEMV+PDL", true, PdlScope::All),
                ("GEMV+PDL-but-GEMV", true, PdlScope::AllButGemv),
                ("GEMV+PDL-GEMV-only", true, PdlScope::GemvOnly),
            ] {
                if scope != PdlScope::Off && !pdl_supported {
                    continue;
                }
                dev.set_pdl_scope(scope);
                big.set_gemv_enabled(gemv);
                big.capture_decode_graphs(64, 2048 + 16)?;
                for &(batch, context, floor_ms) in &floors {
                    if batch > 8 && gemv {
                        continue; // the same cuBLAS products as above
                    }
                    let graph = gpu::decode_step_ms(&mut big, batch, context, 10, true)?;
                    println!(
                        "Llama-3.1-8B dummy decode [{round}] {label:<18} b{batch:<3} c{context:<5} graphs {graph:>8.3} ms  floor {floor_ms:.3} ms (weights + KV bytes at the copy rate)  ratio {:.2}",
                        graph / floor_ms
                    );
                }
            }
        }
        dev.set_pdl_scope(initial_pdl);
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct ExportTokenizerArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The directory to write `tokenizer.json` and `tokenizer_config.json` into.
    #[arg(long)]
    out: PathBuf,
}

/// Writes the model's tokenizer as `tokenizer.json` and `tokenizer_config.json` (e.g. to run a
/// GGUF model's vocabulary with dummy weights of a Hugging Face directory).
pub(crate) fn export_tokenizer(args: ExportTokenizerArgs) -> anyhow::Result<()> {
    let files = args.model.open()?;
    let tokenizer = files.tokenizer.context("the model has no tokenizer")?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let json = tokenizer.inner().to_string(true).map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    std::fs::write(args.out.join("tokenizer.json"), json)?;
    let specials = tokenizer.special_tokens();
    let config = serde_json::json!({
        "bos_token": specials.bos_token,
        "eos_token": specials.eos_token,
        "pad_token": specials.pad_token,
        "unk_token": specials.unk_token,
        "add_bos_token": tokenizer.add_bos_token(),
        "chat_template": tokenizer.chat_template(),
    });
    std::fs::write(args.out.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    eprintln!("wrote {}/tokenizer.json and tokenizer_config.json", args.out.display());
    Ok(())
}

/// The Llama-3.1-8B dummy decode steps (graphs) of each quantized format asked for (`--fp8`,
/// `--ggml`), with the weights they read and each step's copy-rate floor; with `with_bf16`, bf16
/// first, at the same batches.
fn print_quantized_8b_steps(dev: &std::sync::Arc<pagedserve::cuda::GpuDevice>, copy: f64, args: &BenchGpuArgs, with_bf16: bool) -> anyhow::Result<()> {
    use pagedserve::bench::gpu;
    let mut formats: Vec<(gpu::DummyWeights, String)> = Vec::new();
    if with_bf16 {
        formats.push((gpu::DummyWeights::Bf16, "bf16".into()));
    }
    if args.fp8 {
        formats.push((gpu::DummyWeights::Fp8, "FP8".into()));
    }
    for quant in &args.ggml {
        let ty = quant.ggml();
        formats.push((gpu::DummyWeights::Ggml(ty), format!("{ty:?}")));
    }
    for quant in &args.ggml {
        // Each product path at the batch sizes of a single stream and of tens of clients; at one
        // row also two narrow products, whose time is mostly the launch's fixed cost.
        use pagedserve::cuda::gemm::OutType;
        let narrow = [(264, 4096, OutType::Bf16), (264, 14336, OutType::Bf16)];
        gpu::print_ggml_products(dev, quant.ggml(), 1, &[&gpu::LLAMA_8B_PRODUCTS[..], &narrow[..]].concat())?;
        for m in [2, 4, 8, 16, 32, 64, 128] {
            gpu::print_ggml_products(dev, quant.ggml(), m, &gpu::LLAMA_8B_PRODUCTS)?;
        }
    }
    for (weights, label) in formats {
        let mut big = gpu::llama_8b_backend(dev, 64, 2048, weights, KvCacheDtype::Auto)?;
        let memory: Vec<String> = big.model().bytes_by_format().iter().map(|(f, b)| format!("{f:?} {:.2} GiB", *b as f64 / (1u64 << 30) as f64)).collect();
        println!(
            "Llama-3.1-8B {label}: {:.2} GiB of weights read per step; matrices on the device: {}",
            big.model().weight_bytes() as f64 / (1u64 << 30) as f64,
            memory.join(", ")
        );
        gpu::print_step_breakdown(&mut big, 1, 512, &format!("Llama-3.1-8B {label}"))?;
        let c = big.model().config().clone();
        big.capture_decode_graphs(64, 2048 + 16)?;
        for (batch, context) in [(1, 512), (2, 512), (4, 512), (8, 512), (16, 512), (32, 512), (64, 2048)] {
            let kv_bytes = 2 * c.num_hidden_layers * batch * context * c.num_key_value_heads * c.head_dim * 2;
            let floor_ms = (big.model().weight_bytes() + kv_bytes) as f64 / (copy * 1e9) * 1e3;
            let graph = gpu::decode_step_ms(&mut big, batch, context, 10, true)?;
            println!(
                "Llama-3.1-8B dummy decode {label} b{batch:<3} c{context:<5} graphs {graph:>8.3} ms  floor {floor_ms:.3} ms (weights + KV bytes at the copy rate)  ratio {:.2}",
                graph / floor_ms
            );
        }
    }
    Ok(())
}
