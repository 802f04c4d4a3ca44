//! `pagedserve bench scheduler`: the cost of one scheduling-policy call as the engine makes it
//! each step (queue view in, ranking out, validated), for a Wasm scheduler plugin against the
//! native FCFS policy, on a synthetic queue of running and waiting sequences.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::metrics::Metrics;
use crate::plugin::{PluginKind, PluginLimits, PluginRegistry, PluginRuntime, WasmScheduler};
use crate::sched::{validate_ranking, Budget, Fcfs, SchedulingPolicy, SeqView};

#[derive(Debug, Clone, Serialize)]
pub struct SchedulerBenchResult {
    pub running: usize,
    pub waiting: usize,
    pub iterations: usize,
    /// Median of one Wasm `rank` call through the policy seam (conversion, call, validation).
    pub wasm_median_us: f64,
    pub wasm_p99_us: f64,
    /// Median of the native FCFS policy.
    pub native_fcfs_median_us: f64,
    /// Median of the mechanism's own validation of a ranking (paid by every policy).
    pub validate_median_us: f64,
}

fn tenants() -> Vec<String> {
    (0..8).map(|i| format!("tenant-{i}")).collect()
}

/// A queue of `running` sequences mid-decode and `waiting` ones not started.
pub fn synthetic_views(tenants: &[String], running: usize, waiting: usize) -> Vec<SeqView<'_>> {
    (0..running + waiting)
        .map(|i| {
            let is_running = i < running;
            let prompt = 32 + (i * 37) % 400;
            let generated = if is_running { (i * 11) % 200 } else { 0 };
            SeqView {
                id: 1_000 + i as u64 * 3,
                priority: (i % 5) as i32 - 2,
                tenant: &tenants[i % tenants.len()],
                arrival: i as u64,
                prompt_tokens: prompt as u32,
                computed_tokens: if is_running { (prompt + generated) as u32 } else { 0 },
                generated_tokens: generated as u32,
                max_tokens: 256,
                blocks_held: if is_running { (prompt + generated).div_ceil(16) as u32 } else { 0 },
                running: is_running,
            }
        })
        .collect()
}

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

fn time_us(iterations: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..iterations)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

pub fn run(component: &[u8], running: usize, waiting: usize, iterations: usize) -> anyhow::Result<SchedulerBenchResult> {
    let metrics = Arc::new(Metrics::new("bench"));
    let registry = PluginRegistry::new(PluginRuntime::new(PluginLimits::default())?, metrics);
    registry.install(PluginKind::Scheduler, "bench", component, None, "", "bench")?;
    let mut wasm = WasmScheduler::new(registry.slot(PluginKind::Scheduler, "bench").expect("installed"), Box::new(crate::sched::Fcfs));
    let tenants = tenants();
    let views = synthetic_views(&tenants, running, waiting);
    let budget = Budget { free_blocks: 1_000, total_blocks: 20_000, block_size: 16, token_budget: 2_048, max_seqs: 256 };
    // Warm-up (instance caches, allocator growth), and a check that the answer is valid.
    for _ in 0..20 {
        let ranking = wasm.rank(&views, &budget).map_err(|e| anyhow::anyhow!("{e}"))?;
        validate_ranking(&views, &ranking)?;
    }
    let mut wasm_us = time_us(iterations, || {
        std::hint::black_box(wasm.rank(&views, &budget).ok());
    });
    let mut native_us = time_us(iterations, || {
        std::hint::black_box(Fcfs.rank(&views, &budget).ok());
    });
    let ranking = Fcfs.rank(&views, &budget).unwrap();
    let mut validate_us = time_us(iterations, || {
        std::hint::black_box(validate_ranking(&views, &ranking).ok());
    });
    Ok(SchedulerBenchResult {
        running,
        waiting,
        iterations,
        wasm_median_us: percentile(&mut wasm_us, 0.5),
        wasm_p99_us: percentile(&mut wasm_us, 0.99),
        native_fcfs_median_us: percentile(&mut native_us, 0.5),
        validate_median_us: percentile(&mut validate_us, 0.5),
    })
}
