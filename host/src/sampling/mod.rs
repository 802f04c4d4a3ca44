//! Native sampling: turns one sequence's logits into its next token under the request's
//! `SamplingParams` (greedy, temperature, top-k, top-p, min-p, presence / frequency / repetition
//! penalties, logit bias, seeded randomness) and reports log-probabilities.
//!
//! Determinism: each sequence owns its random generator, seeded from the request's `seed` (and the
//! sample's index for `n > 1`), so a seeded request draws the same tokens whatever else shares its
//! batch.

mod params;
mod rows;
mod sampler;

pub use self::params::{SamplingParams, SamplingParamsError, MAX_LOGPROBS};
pub use self::rows::{prepare_constraint_masks, prepare_constraints, sample_rows_host, RowSampling, SampledRow};
pub use self::sampler::{argmax, log_softmax_f64, Sampled, SequenceSampler, TokenLogprob};
