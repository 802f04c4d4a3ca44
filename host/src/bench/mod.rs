//! Benchmarks the binary runs on itself (`pagedserve bench ...`): raw decode throughput of the
//! model at fixed batch sizes, the serving engine under a ShareGPT-like load, and the cost of a
//! scheduling-policy call (Wasm plugin against native).

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
