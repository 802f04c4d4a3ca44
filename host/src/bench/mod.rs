//! The tools the binary runs on itself, outside the serving core (the `tools` feature, on by
//! default): benchmarks (`pagedserve bench ...`: raw decode throughput of the model at fixed batch
//! sizes, the serving engine under a ShareGPT-like load, GPU kernels and steps, the cost of a
//! scheduling-policy call) and the GPU self-checks (`pagedserve check`, every kernel and the
//! forward against the CPU path). Nothing in the serving core imports this module.

pub mod check;
pub mod check_quant;
pub mod decode;
pub mod gpu;
pub mod scheduler;
pub mod serve;

/// The median of `values` (sorted in place); `NaN` for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
