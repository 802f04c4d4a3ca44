//! `pagedserve serve`: loads the model, sizes the KV cache, starts the engine thread and the HTTP
//! server, and shuts both down gracefully on Ctrl-C or SIGTERM (requests in flight finish; a
//! second signal exits at once). Every flag has a `PAGEDSERVE_*` environment fallback.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use pagedserve::engine::{EngineConfig, EngineHandle};
use pagedserve::kv_cache::DEFAULT_BLOCK_SIZE;
use pagedserve::metrics::Metrics;
use pagedserve::plugin::{PluginKind, PluginLimits, PluginRegistry, PluginRuntime, PluginsConfig};
use pagedserve::sched::{native_policy, SchedulerConfig};
use pagedserve::server::guard::AccessPolicy;
use pagedserve::server::{self, AppState, DEFAULT_MAX_REQUEST_BODY};
use pagedserve::validation::Validator;

use crate::tensor_parallel::{CacheShape, TensorParallelArgs};
use crate::ModelArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when built and available, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    Fcfs,
    Priority,
}

/// `--async-scheduling` (of `serve` and `bench serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AsyncScheduling {
    Auto,
    On,
    Off,
}

impl AsyncScheduling {
    /// The backend the engine gets, and whether its steps are pipelined: `auto` where the backend
    /// pipelines itself, `on` always (behind a `HostPipeline`, without overlap, where it cannot).
    pub fn apply(self, backend: Box<dyn pagedserve::runner::ModelBackend>) -> (Box<dyn pagedserve::runner::ModelBackend>, bool) {
        let on = match self {
            AsyncScheduling::Auto => backend.pipelined(),
            AsyncScheduling::On => true,
            AsyncScheduling::Off => false,
        };
        if on && !backend.pipelined() {
            return (Box::new(pagedserve::runner::HostPipeline::new(backend)), true);
        }
        (backend, on)
    }
}

/// Default CPU memory for the KV cache when neither `--num-kv-blocks` nor
/// `--kv-cache-memory-gb` is given.
const DEFAULT_KV_CACHE_GB: f64 = 1.0;
/// Labels of `pagedserve_request_failure_total`: the server's own and the engine's.
const FAILURE_LABELS: [&str; 12] = [
    "invalid_request",
    "body_too_large",
    "unsupported_media_type",
    "body_timeout",
    "model_not_found",
    "queue_full",
    "unavailable",
    "forward",
    "detokenize",
    "too_large",
    "plugin",
    "filter",
];

/// Default ceiling of `--max-model-len` (the model's own context may be larger).
const DEFAULT_MAX_MODEL_LEN_CAP: usize = 8192;
/// Default token budget of an engine step on the GPU.
const DEFAULT_GPU_STEP_TOKENS: usize = 2048;
/// ... and on the CPU, where a step of 2048 prompt tokens takes 12-20 s on two cores (every
/// stream waits that long); 128 keeps a step near a second.
const DEFAULT_CPU_STEP_TOKENS: usize = 128;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    tensor_parallel: TensorParallelArgs,
    /// Address to listen on.
    #[arg(long, env = "PAGEDSERVE_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the bound address is printed to stderr).
    #[arg(long, env = "PAGEDSERVE_PORT", default_value_t = 8000)]
    port: u16,
    /// The model name clients use and see [default: the model file's name]
    #[arg(long, env = "PAGEDSERVE_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    #[arg(long, value_enum, env = "PAGEDSERVE_DEVICE", default_value = "auto")]
    device: Device,
    /// Longest sequence (prompt plus completion) [default: min(model context, 8192)]
    #[arg(long, env = "PAGEDSERVE_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, env = "PAGEDSERVE_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    /// KV-cache blocks to allocate (instead of --kv-cache-memory-gb).
    #[arg(long, env = "PAGEDSERVE_NUM_KV_BLOCKS", conflicts_with = "kv_cache_memory_gb")]
    num_kv_blocks: Option<usize>,
    /// Memory for the KV cache, in GiB [default: on the CPU 1; on the GPU what
    /// --gpu-memory-utilization leaves]
    #[arg(long, env = "PAGEDSERVE_KV_CACHE_MEMORY_GB")]
    kv_cache_memory_gb: Option<f64>,
    /// Most sequences in the running batch.
    #[arg(long, env = "PAGEDSERVE_MAX_NUM_SEQS", default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens computed in one engine step (prefill chunks plus decode tokens).
    /// Token budget of one engine step. Default: 2048 on the GPU; on the CPU 128, so that a long
    /// prompt is prefilled in chunks of about a second and other streams keep moving.
    #[arg(long, env = "PAGEDSERVE_MAX_NUM_BATCHED_TOKENS")]
    max_num_batched_tokens: Option<usize>,
    /// Prompt pacing at light load: while every sequence, running and waiting, fits in a step of
    /// this many tokens, a step takes at most this many (each running decode its token, prompt
    /// chunks what is left), so that a burst of prompts starts over a few steps instead of
    /// stalling every stream behind one long prefill (the first tokens come sooner, the decode
    /// steps are a little longer). 0 turns it off. Off by default: with many long prompts, small
    /// paced steps read the weights more often for each token (BENCHMARKS.md, session 34).
    #[arg(long, env = "PAGEDSERVE_LIGHT_LOAD_STEP_TOKENS", default_value_t = 0)]
    light_load_step_tokens: usize,
    /// Most requests waiting to start; more are refused with 429.
    #[arg(long, env = "PAGEDSERVE_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Turn automatic prefix caching off.
    #[arg(long, env = "PAGEDSERVE_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    /// Async scheduling: schedule and launch step N+1 while step N runs on the GPU, its decode
    /// tokens fed from step N's samples on the device. `auto`: on with one GPU, off on the CPU
    /// (where nothing overlaps: `on` there runs the same pipelined engine path, for testing).
    #[arg(long, value_enum, env = "PAGEDSERVE_ASYNC_SCHEDULING", default_value = "auto")]
    async_scheduling: AsyncScheduling,
    #[arg(long, value_enum, env = "PAGEDSERVE_SCHEDULING_POLICY", default_value = "fcfs")]
    scheduling_policy: Policy,
    /// Run decode steps kernel by kernel instead of replaying CUDA graphs captured at start-up
    /// (CUDA only; graphs cover batches up to --max-num-seqs, at most 256, and contexts up to
    /// --max-model-len).
    #[arg(long, env = "PAGEDSERVE_NO_CUDA_GRAPHS")]
    no_cuda_graphs: bool,
    /// Share of the GPU memory left after the weights that the KV cache may take (CUDA only).
    #[arg(long, env = "PAGEDSERVE_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "PAGEDSERVE_MAX_REQUEST_BODY", default_value_t = DEFAULT_MAX_REQUEST_BODY)]
    max_request_body: usize,
    /// JSON file naming the plugins to load at start-up (scheduler, samplers, filters).
    #[arg(long, env = "PAGEDSERVE_PLUGINS_CONFIG")]
    plugins_config: Option<std::path::PathBuf>,
    /// Wall-time budget of one scheduler plugin call, in milliseconds.
    #[arg(long, env = "PAGEDSERVE_PLUGIN_SCHEDULER_DEADLINE_MS", default_value_t = 20)]
    plugin_scheduler_deadline_ms: u64,
    /// Wall-time budget of one sampler plugin call (a whole batch), in milliseconds.
    #[arg(long, env = "PAGEDSERVE_PLUGIN_SAMPLER_DEADLINE_MS", default_value_t = 50)]
    plugin_sampler_deadline_ms: u64,
    /// Wall-time budget of one filter plugin call, in milliseconds.
    #[arg(long, env = "PAGEDSERVE_PLUGIN_FILTER_DEADLINE_MS", default_value_t = 20)]
    plugin_filter_deadline_ms: u64,
    /// Wall-time budget of one constraint plugin call (one step's masks for all its sequences).
    #[arg(long, env = "PAGEDSERVE_PLUGIN_CONSTRAINT_DEADLINE_MS", default_value_t = 20)]
    plugin_constraint_deadline_ms: u64,
    /// Linear memory of one plugin instance, in MiB.
    #[arg(long, env = "PAGEDSERVE_PLUGIN_MAX_MEMORY_MB", default_value_t = 64)]
    plugin_max_memory_mb: usize,
    /// Largest plugin component accepted (config file or admin upload), in bytes.
    #[arg(long, env = "PAGEDSERVE_PLUGIN_MAX_COMPONENT_BYTES", default_value_t = 16 << 20)]
    plugin_max_component_bytes: usize,
    /// Address of the admin API's listener.
    #[arg(long, env = "PAGEDSERVE_ADMIN_HOST", default_value = "127.0.0.1")]
    admin_host: String,
    /// Port of the admin API's listener (0 picks a free one); needs --admin-token.
    #[arg(long, env = "PAGEDSERVE_ADMIN_PORT")]
    admin_port: Option<u16>,
    /// Bearer token of the admin API; without one the admin API is off.
    #[arg(long, env = "PAGEDSERVE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How the model writes tool calls (default: from its chat template; `hermes` when the
    /// template has no tools, which are then described in the system prompt).
    #[arg(long, value_enum, env = "PAGEDSERVE_TOOL_CALL_PARSER")]
    tool_call_parser: Option<pagedserve::tool_calls::ToolCallFormat>,
    /// `Host` names the server answers to, comma-separated (`*`: any). Default: loopback names
    /// when bound to a loopback address (against DNS rebinding), any otherwise.
    #[arg(long, env = "PAGEDSERVE_ALLOWED_HOSTS")]
    allowed_hosts: Option<String>,
    /// Cross-site origins allowed to call the API from a browser (`https://app.example`),
    /// comma-separated (`*`: any); CORS preflights are answered for them. Default: none.
    #[arg(long, env = "PAGEDSERVE_ALLOWED_ORIGINS")]
    allowed_origins: Option<String>,
    /// Seconds a request's headers may take to arrive; an idle keep-alive connection is closed
    /// after as long.
    #[arg(long, env = "PAGEDSERVE_HEADER_READ_TIMEOUT", default_value_t = 30.0)]
    header_read_timeout: f64,
    /// Seconds a request body may take to arrive (408 after).
    #[arg(long, env = "PAGEDSERVE_BODY_READ_TIMEOUT", default_value_t = 60.0)]
    body_read_timeout: f64,
    /// Most connections open at once per listener (more wait in the kernel's backlog).
    #[arg(long, env = "PAGEDSERVE_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Seconds a shutdown waits for requests in flight before cutting them off.
    #[arg(long, env = "PAGEDSERVE_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Threads of the async runtime that serves HTTP. Default: the machine's cores, at most 8.
    #[arg(long, env = "PAGEDSERVE_HTTP_WORKERS")]
    http_workers: Option<usize>,
    /// Testing aid: every forward pass fails once this many have run.
    #[arg(long, hide = true, env = "PAGEDSERVE_INJECT_FORWARD_FAULT")]
    inject_forward_fault: Option<usize>,
}

/// `blocks` blocks of `block_bytes`, in GiB.
fn gib_of(blocks: usize, block_bytes: usize) -> f64 {
    blocks as f64 * block_bytes as f64 / (1u64 << 30) as f64
}

/// The host memory available to a new allocation (Linux's `MemAvailable`), if known.
fn host_memory_available() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A non-negative, finite number of seconds from a flag.
fn seconds(flag: &str, value: f64) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(value).map_err(|_| anyhow::anyhow!("{flag} must be a number of seconds >= 0, not {value}"))
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let use_cuda = match args.device {
        Device::Cpu => false,
        Device::Cuda => {
            if !pagedserve::cuda::is_available() {
                bail!("--device cuda: no CUDA driver or GPU found (is libcuda.so on the library path?); use --device cpu");
            }
            true
        }
        Device::Auto => pagedserve::cuda::is_available(),
    };
    let max_num_batched_tokens = args.max_num_batched_tokens.unwrap_or(if use_cuda {
        DEFAULT_GPU_STEP_TOKENS
    } else {
        DEFAULT_CPU_STEP_TOKENS
    });
    if args.block_size == 0 || args.max_num_seqs == 0 || max_num_batched_tokens == 0 {
        bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be at least 1");
    }
    if args.max_connections == 0 || args.http_workers == Some(0) || args.max_queue == 0 {
        bail!("--max-connections, --http-workers and --max-queue must be at least 1");
    }
    if let Some(gib) = args.kv_cache_memory_gb.filter(|gib| !(gib.is_finite() && *gib > 0.0)) {
        bail!("--kv-cache-memory-gb must be a positive number of GiB, got {gib}");
    }
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        bail!("--gpu-memory-utilization must be above 0 and at most 1, got {}", args.gpu_memory_utilization);
    }
    let connection_limits = server::listen::ConnectionLimits {
        header_read_timeout: seconds("--header-read-timeout", args.header_read_timeout)?,
        max_connections: args.max_connections,
        drain_timeout: seconds("--shutdown-timeout", args.shutdown_timeout)?,
    };
    let body_read_timeout = seconds("--body-read-timeout", args.body_read_timeout)?;
    let http_workers = args
        .http_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8));
    let path = args.model.model.clone().unwrap_or_else(pagedserve::loader::default_model_path);
    let files = args.model.open()?;
    let tokenizer = files.tokenizer.clone().context("the model has no tokenizer; the server needs one")?;
    let config = files.config.clone();
    let name = files.name.clone();
    // Before any weight is read: a split the model cannot take fails at once.
    args.tensor_parallel.check_plan(&config)?;
    let tensor_parallel_size = args.tensor_parallel.world();

    let context = config.max_position_embeddings;
    let max_model_len = match args.max_model_len {
        Some(len) if len > context => {
            bail!("--max-model-len {len} is longer than the model's context of {context} tokens")
        }
        Some(0) => bail!("--max-model-len must be at least 1"),
        Some(len) => len,
        None => context.min(DEFAULT_MAX_MODEL_LEN_CAP),
    };

    // The GPU backend loads its weights straight to the device first, so its cache can be sized
    // from what is left; the CPU backend loads them to the host.
    let (gpu, cpu_weights) = if use_cuda {
        tracing::info!(architecture = %config.architecture, tensor_parallel_size, "serving on the GPU");
        let models = args
            .tensor_parallel
            .load_gpu(&args.model, &files)
            .with_context(|| format!("loading {name} to the GPU"))?;
        drop(files);
        (Some(models), None)
    } else {
        args.model.refuse_quantization("the CPU backend")?;
        (None, Some(args.tensor_parallel.load_cpu(files)?))
    };
    let kv_dtype = args.model.kv_cache_dtype;
    // Over every tensor-parallel rank's cache on the CPU (replicated KV heads count each time).
    let block_bytes = match (&cpu_weights, &gpu) {
        (Some(weights), _) => weights.kv_block_bytes(args.block_size, kv_dtype),
        (None, Some(models)) => models.kv_block_bytes(args.block_size, kv_dtype),
        (None, None) => unreachable!("weights on the CPU or the GPU"),
    };
    // --num-kv-blocks, else --kv-cache-memory-gb, else on the GPU what --gpu-memory-utilization
    // leaves and on the CPU DEFAULT_KV_CACHE_GB; never more than the device can hold.
    let blocks_of = |gib: f64| (gib * (1u64 << 30) as f64 / block_bytes as f64) as usize;
    let asked = match (args.num_kv_blocks, args.kv_cache_memory_gb) {
        (Some(n), _) => Some(n),
        (None, Some(gib)) => Some(blocks_of(gib)),
        (None, None) => None,
    };
    let num_blocks = match (&gpu, asked) {
        (Some(models), None) => models.blocks_that_fit(args.block_size, args.gpu_memory_utilization, kv_dtype)?,
        (Some(models), Some(n)) => {
            let room = models.blocks_that_fit(args.block_size, 1.0, kv_dtype)?;
            if n > room {
                bail!(
                    "the KV cache asked for ({n} blocks, {:.2} GiB) is more than the GPU has free after the weights \
                     ({room} blocks, {:.2} GiB)",
                    gib_of(n, block_bytes),
                    gib_of(room, block_bytes)
                );
            }
            n
        }
        (None, asked) => {
            let n = asked.unwrap_or_else(|| blocks_of(DEFAULT_KV_CACHE_GB));
            // The cache is allocated whole at start-up: one that cannot be is refused here, with the
            // sizes, rather than by the allocator aborting the process.
            if let Some(available) = host_memory_available() {
                if n.checked_mul(block_bytes).is_none_or(|bytes| bytes > available) {
                    bail!(
                        "the KV cache asked for ({n} blocks, {:.2} GiB) is more than this machine's available memory ({:.2} GiB)",
                        gib_of(n, block_bytes),
                        gib_of(available, 1)
                    );
                }
            }
            n
        }
    };
    // The blocks one sequence of --max-model-len holds at once: all of them, or with a window on
    // every layer, the window and the largest chunk plus a partial block at each end (blocks
    // before the window are given back as it advances).
    let span = config.all_layers_sliding().map_or(max_model_len, |window| (window + max_num_batched_tokens).min(max_model_len));
    let needed = span.div_ceil(args.block_size) + usize::from(span < max_model_len) * 2;
    if num_blocks < needed {
        bail!(
            "the KV cache has {num_blocks} blocks of {} tokens ({} tokens), but one sequence of --max-model-len \
             {max_model_len} needs {needed} blocks at once: raise --num-kv-blocks / --kv-cache-memory-gb or lower --max-model-len",
            args.block_size,
            num_blocks * args.block_size
        );
    }
    tracing::info!(
        blocks = num_blocks,
        block_size = args.block_size,
        tokens = num_blocks * args.block_size,
        dtype = kv_dtype.name(),
        mib = (block_bytes * num_blocks) as f64 / (1u64 << 20) as f64,
        max_model_len,
        "KV cache sized"
    );

    let model_name = args.served_model_name.clone().unwrap_or_else(|| name.clone());
    let metrics = Arc::new(Metrics::new(&model_name));
    // vLLM's label names: `num_gpu_blocks` counts the cache's blocks on either device.
    metrics.cache_config_info.with_label_values(&[&args.block_size.to_string(), &num_blocks.to_string(), kv_dtype.name()]).set(1);
    let policy_name = match args.scheduling_policy {
        Policy::Fcfs => "fcfs",
        Policy::Priority => "priority",
    };
    // Every labelled series exists from the start, at zero, so dashboards and rate() see them.
    for reason in ["stop", "length", "abort"] {
        metrics.request_success.with_label_values(&[reason]).reset();
    }
    for label in FAILURE_LABELS {
        metrics.request_failure.with_label_values(&[label]).reset();
    }
    for reason in ["invalid_output", "failed"] {
        metrics.scheduler_policy_faults.with_label_values(&[policy_name, reason]).reset();
    }
    let policy = native_policy(policy_name).with_context(|| format!("no native scheduling policy {policy_name}"))?;
    let vocab_size = config.vocab_size;
    let cache = CacheShape { num_blocks, block_size: args.block_size, dtype: kv_dtype };
    let backend: Box<dyn pagedserve::runner::ModelBackend> = match gpu {
        Some(models) => models.into_backend(&config, cache, !args.no_cuda_graphs, args.max_num_seqs, max_model_len)?,
        None => cpu_weights.expect("loaded for the CPU").into_backend(cache),
    };
    let (backend, async_scheduling) = args.async_scheduling.apply(backend);
    tracing::info!(async_scheduling, "engine steps {}", if async_scheduling { "pipelined" } else { "one at a time" });
    let backend = match args.inject_forward_fault {
        Some(succeed) => {
            tracing::warn!(succeed, "--inject-forward-fault: forward passes fail after this many");
            Box::new(pagedserve::runner::FaultyBackend::new(backend, succeed))
        }
        None => backend,
    };
    let engine_config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens,
            light_load_step_tokens: args.light_load_step_tokens,
        },
        max_model_len,
        max_queue: args.max_queue,
        prefix_caching: !args.no_prefix_caching,
        async_scheduling,
    };
    let (engine, engine_thread) =
        EngineHandle::spawn(backend, tokenizer.clone(), metrics.clone(), policy, engine_config);

    let limits = PluginLimits {
        scheduler_deadline: std::time::Duration::from_millis(args.plugin_scheduler_deadline_ms.max(1)),
        sampler_deadline: std::time::Duration::from_millis(args.plugin_sampler_deadline_ms.max(1)),
        filter_deadline: std::time::Duration::from_millis(args.plugin_filter_deadline_ms.max(1)),
        constraint_deadline: std::time::Duration::from_millis(args.plugin_constraint_deadline_ms.max(1)),
        max_memory_bytes: args
            .plugin_max_memory_mb
            .max(1)
            .checked_mul(1 << 20)
            .context("--plugin-max-memory-mb is larger than this machine's address space")?,
        max_component_bytes: args.plugin_max_component_bytes,
        ..PluginLimits::default()
    };
    let runtime = PluginRuntime::new(limits)?;
    match pagedserve::constraint::token_bytes(&tokenizer) {
        Ok(vocabulary) => runtime.set_vocabulary(vocabulary),
        Err(e) => tracing::warn!("constraint plugins get an empty vocabulary: {e}"),
    }
    let plugins = PluginRegistry::new(runtime, metrics.clone());
    plugins.set_native_scheduler(policy_name)?;
    plugins.attach_engine(engine.clone())?;
    if let Some(path) = &args.plugins_config {
        let config = PluginsConfig::load(path)?;
        config.apply(&plugins)?;
    }
    for kind in PluginKind::ALL {
        for info in plugins.list().iter().filter(|p| p.kind == kind.as_str()) {
            tracing::info!(%kind, name = %info.name, version = ?info.active_version, "plugin loaded");
        }
    }
    let admin = match (args.admin_port, args.admin_token.clone().filter(|t| !t.is_empty())) {
        (Some(port), Some(token)) => Some((port, token)),
        (Some(_), None) => {
            tracing::warn!("--admin-port given without --admin-token / PAGEDSERVE_ADMIN_TOKEN: the admin API is off");
            None
        }
        (None, _) => {
            tracing::info!("no --admin-port: the admin API is off");
            None
        }
    };

    let validator = Validator::new(tokenizer.clone(), max_model_len, vocab_size)
        .with_plugins(plugins.clone())
        .with_tool_call_format(args.tool_call_parser);
    tracing::info!(format = ?validator.tool_call_format(), "tool calls are parsed in this format");
    let state = Arc::new(AppState {
        engine: engine.clone(),
        validator,
        plugins: Some(plugins.clone()),
        tokenizer,
        metrics,
        model_name: model_name.clone(),
        model_root: path.display().to_string(),
        created: pagedserve_now(),
        max_request_body: args.max_request_body,
        body_read_timeout,
        cpu_slots: AppState::default_cpu_slots(),
        admin_port: Default::default(),
        ui_snapshot: Default::default(),
    });
    {
        // The vocabulary's index for structured outputs and tools, built while the server starts.
        let state = state.clone();
        std::thread::Builder::new().name("pagedserve-constraints".into()).spawn(move || state.validator.warm_constraints())?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(http_workers)
        .thread_name("pagedserve-http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let address = format!("{}:{}", args.host, args.port);
        let listener =
            tokio::net::TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
        let bound = listener.local_addr()?;
        let listener_port = bound.port();
        let device = if use_cuda { "cuda" } else { "cpu" };
        tracing::info!(model = %model_name, %bound, policy = policy_name, device, tensor_parallel_size, "serving");
        eprintln!("pagedserve listening on http://{bound}");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some((port, token)) = admin {
            let address = format!("{}:{}", args.admin_host, port);
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .with_context(|| format!("binding the admin API to {address}"))?;
            let admin_bound = listener.local_addr()?;
            let _ = state.admin_port.set(admin_bound.port());
            let bound = admin_bound;
            tracing::info!(%bound, "admin API serving");
            eprintln!("pagedserve admin API listening on http://{bound}");
            let admin_state = Arc::new(server::admin::AdminState { registry: plugins.clone(), token });
            let public_port = listener_port;
            let access = Arc::new(
                AccessPolicy::for_bind(&args.admin_host, args.allowed_hosts.as_deref(), args.allowed_origins.as_deref())
                    .with_ui_port(public_port),
            );
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = server::admin::serve(listener, admin_state, access, connection_limits, shutdown).await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
        }
        let shutdown = async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        };
        let access = Arc::new(AccessPolicy::for_bind(&args.host, args.allowed_hosts.as_deref(), args.allowed_origins.as_deref()));
        let drained = server::serve(listener, state, access, connection_limits, shutdown).await.context("serving HTTP")?;
        if drained.cut_off > 0 {
            tracing::warn!(connections = drained.cut_off, "shutdown deadline (--shutdown-timeout) passed: cut off the connections still open");
            eprintln!("pagedserve: shutdown deadline passed; cut off {} open connection(s)", drained.cut_off);
        }
        anyhow::Ok(())
    });
    engine.shutdown();
    let _ = engine_thread.join();
    tracing::info!("stopped");
    result
}

fn pagedserve_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Resolves on the first Ctrl-C or SIGTERM; a second one exits the process at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutting down: finishing requests in flight (signal again to exit now)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
