//! Sampling on the device (`sample_rows` in `kernels/sampling.cu`): one step's `RowSampling`s
//! packed into one upload (a fixed block of parameter words per sample, then CSR arrays of logit
//! bias and penalty entries) and the token bitmasks of the constrained samples in a second one
//! (structured outputs and constraint plugins cost `vocab / 8` bytes per sample, never a logits
//! copy; the masks are computed while the forward runs),
//! one 1024-thread block per sample on the logits the forward left on
//! the device (plain greedy samples, the common case, are split over many blocks instead:
//! `greedy_chunks`), and one download of only what the host needs: tokens, log-probs, candidates.
//!
//! A launch (`launch_sampling`) enqueues all of that and returns; `collect_sampling` waits for
//! its download. Two launches may be outstanding (async scheduling), so the buffers come in two
//! sets used by alternate launches, and the last launch's output stays on the device for the next
//! batch's fed tokens (`SamplingBuffers::fed_source`).
//!
//! Invariants: the parameter words here and the `P_*` words of the kernel agree
//! (`PARAM_WORDS == SAMPLE_PARAM_WORDS`); a sample reads only a real logits row (`row <
//! num_logit_rows`: padding rows of a CUDA-graph bucket are never sampled); a token result is
//! `observe`d by its sampler, as the host sampler does. Packing and unpacking are plain functions,
//! unit-tested without a GPU.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaEvent, CudaSlice, LaunchConfig, PinnedHostSlice};

use super::batch::grow_pinned;
use super::launchers;
use super::model::ptr;
use super::profile::{ServingStepTimer, StepMark};
use super::{CudaError, GpuDevice};
use crate::runner::FedToken;
use crate::sampling::{prepare_constraint_masks, RowSampling, Sampled, SampledRow, TokenLogprob};

/// Words of one sample's parameters (`SAMPLE_PARAM_WORDS` in the kernel).
pub const PARAM_WORDS: usize = 22;
/// Most candidates or alternatives one sample returns (`MAX_LIST` in the kernel).
pub const MAX_LIST: usize = 1024;

/// Word offsets inside one sample's parameters (the kernel's `P_*`).
mod word {
    pub const ROW: usize = 0;
    pub const FLAGS: usize = 1;
    pub const TEMPERATURE: usize = 2;
    pub const TOP_K: usize = 3;
    pub const TOP_P: usize = 4;
    pub const MIN_P: usize = 5;
    pub const PRESENCE: usize = 6;
    pub const FREQUENCY: usize = 7;
    pub const REPETITION: usize = 8;
    pub const SEED: usize = 9; // and 10
    pub const STEP: usize = 11; // and 12
    pub const BIAS: usize = 13; // begin, end
    pub const PENALTY: usize = 15; // begin, end
    pub const LOGPROBS: usize = 17;
    pub const TOP_N: usize = 18;
    pub const OUT: usize = 19;
    pub const WORK: usize = 20;
    /// Word offset of the sample's token bitmask in the upload, or `NO_MASK`.
    pub const MASK: usize = 21;
}

/// `word::MASK` of an unconstrained sample.
const NO_MASK: u32 = u32::MAX;

const F_GREEDY: u32 = 1;
const F_CANDIDATES: u32 = 2;
const F_MODIFIED: u32 = 4;
const F_LOGPROB: u32 = 8;
/// A plain greedy sample (`F_GREEDY` and nothing else) that `greedy_chunks` takes.
const F_CHUNKED: u32 = 16;

/// Logits of one `greedy_chunks` block (`GREEDY_CHUNK` in the kernel), and its threads.
const GREEDY_CHUNK: usize = 2048;
const GREEDY_THREADS: u32 = 256;

/// What one sample's output region holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RowOutput {
    /// A token and its log-prob (if `logprob`), then `alternatives` (token, log-prob) pairs.
    Token { offset: usize, logprob: bool, alternatives: usize },
    /// `n` (token, logit) pairs after the two header words.
    Candidates { offset: usize, n: usize },
}

/// One step's samples as the kernel reads them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PackedRows {
    /// `[samples, PARAM_WORDS]`, then bias tokens, bias values (f32 bits), penalty tokens and
    /// penalty counts (output occurrences; 0 for a prompt-only token). Masks go up separately
    /// (`ceil(vocab / 32)` words per sample slot; `word::MASK` is the slot's offset).
    pub words: Vec<u32>,
    pub bias_tokens: usize,
    pub bias_values: usize,
    pub penalty_tokens: usize,
    pub penalty_counts: usize,
    pub outputs: Vec<RowOutput>,
    /// Words of the output buffer.
    pub out_len: usize,
    /// Samples with bias or penalties: each gets a work row of `vocab` floats.
    pub work_rows: usize,
    /// Plain greedy samples marked `F_CHUNKED`: `greedy_chunks` takes them, `sample_rows` the
    /// others.
    pub plain_greedy: usize,
}

/// The penalty entries of a sample: every token the repetition penalty covers (prompt and
/// output) or, without it, the output tokens; each with its output count.
fn penalty_entries(r: &RowSampling<'_>, vocab: usize) -> Vec<(u32, u32)> {
    let p = r.sampler.params();
    let counts = r.sampler.output_counts();
    let mut entries = Vec::new();
    if p.repetition_penalty != 1.0 {
        let prompt = r.sampler.prompt_tokens();
        entries.extend(prompt.iter().map(|&t| (t, counts.get(&t).copied().unwrap_or(0))));
        entries.extend(counts.iter().filter(|(t, _)| prompt.binary_search(t).is_err()).map(|(&t, &c)| (t, c)));
    } else if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        entries.extend(counts.iter().map(|(&t, &c)| (t, c)));
    }
    entries.retain(|&(t, _)| (t as usize) < vocab);
    entries
}

/// `unobserved[i]` (absent: false): row `i`'s sampler has a token in flight that it has not
/// observed yet, so the row draws at the step after its observed ones. With `chunked_greedy`,
/// plain greedy samples are marked for `greedy_chunks`.
pub(crate) fn pack_rows(rows: &[RowSampling<'_>], vocab: usize, unobserved: &[bool], chunked_greedy: bool) -> PackedRows {
    let mut params = vec![0u32; rows.len() * PARAM_WORDS];
    let (mut bias_tokens, mut bias_values) = (Vec::new(), Vec::new());
    let (mut penalty_tokens, mut penalty_counts) = (Vec::new(), Vec::new());
    let mut outputs = Vec::with_capacity(rows.len());
    let (mut out_len, mut work_rows, mut plain_greedy) = (0, 0, 0);
    for (i, (r, w)) in rows.iter().zip(params.chunks_exact_mut(PARAM_WORDS)).enumerate() {
        let p = r.sampler.params();
        let bias_begin = bias_tokens.len() as u32;
        for (&t, &b) in p.logit_bias.iter().filter(|(&t, _)| (t as usize) < vocab) {
            bias_tokens.push(t);
            bias_values.push(b.to_bits());
        }
        let penalty_begin = penalty_tokens.len() as u32;
        for (t, c) in penalty_entries(r, vocab) {
            penalty_tokens.push(t);
            penalty_counts.push(c);
        }
        // A constrained sample's mask: its slot in the mask upload (`prepare_constraint_masks`).
        w[word::MASK] = match r.sampler.constraint() {
            Some(_) => (i * vocab.div_ceil(32)) as u32,
            None => NO_MASK,
        };
        let modified = bias_tokens.len() as u32 > bias_begin
            || penalty_tokens.len() as u32 > penalty_begin
            || w[word::MASK] != NO_MASK;
        let mut flags = if modified { F_MODIFIED } else { 0 };
        let output = match r.candidates {
            Some(n) => {
                flags |= F_CANDIDATES;
                RowOutput::Candidates { offset: out_len, n: n.min(vocab).min(MAX_LIST) }
            }
            None => {
                if p.is_greedy() {
                    flags |= F_GREEDY;
                }
                if p.logprobs.is_some() {
                    flags |= F_LOGPROB;
                }
                let alternatives = p.logprobs.unwrap_or(0).min(vocab).min(MAX_LIST);
                RowOutput::Token { offset: out_len, logprob: p.logprobs.is_some(), alternatives }
            }
        };
        let (offset, pairs) = match output {
            RowOutput::Token { offset, alternatives, .. } => (offset, alternatives),
            RowOutput::Candidates { offset, n } => (offset, n),
        };
        out_len += 2 + 2 * pairs;
        outputs.push(output);
        let in_flight = u64::from(unobserved.get(i).copied().unwrap_or(false));
        let (seed, step) = (r.sampler.device_seed(), r.sampler.num_observed() + in_flight);
        w[word::ROW] = r.row as u32;
        w[word::FLAGS] = flags;
        w[word::TEMPERATURE] = p.temperature.to_bits();
        // 0 or a limit past the vocabulary: no top-k cut.
        w[word::TOP_K] = if p.top_k >= vocab { 0 } else { p.top_k as u32 };
        w[word::TOP_P] = p.top_p.to_bits();
        w[word::MIN_P] = p.min_p.to_bits();
        w[word::PRESENCE] = p.presence_penalty.to_bits();
        w[word::FREQUENCY] = p.frequency_penalty.to_bits();
        w[word::REPETITION] = p.repetition_penalty.to_bits();
        w[word::SEED] = seed as u32;
        w[word::SEED + 1] = (seed >> 32) as u32;
        w[word::STEP] = step as u32;
        w[word::STEP + 1] = (step >> 32) as u32;
        w[word::BIAS] = bias_begin;
        w[word::BIAS + 1] = bias_tokens.len() as u32;
        w[word::PENALTY] = penalty_begin;
        w[word::PENALTY + 1] = penalty_tokens.len() as u32;
        w[word::LOGPROBS] = pairs as u32 * u32::from(r.candidates.is_none());
        w[word::TOP_N] = pairs as u32 * u32::from(r.candidates.is_some());
        w[word::OUT] = offset as u32;
        w[word::WORK] = work_rows as u32;
        work_rows += usize::from(modified);
        if chunked_greedy && flags == F_GREEDY {
            w[word::FLAGS] = F_GREEDY | F_CHUNKED;
            plain_greedy += 1;
        }
    }
    let bias_tokens_at = params.len();
    let bias_values_at = bias_tokens_at + bias_tokens.len();
    let penalty_tokens_at = bias_values_at + bias_values.len();
    let penalty_counts_at = penalty_tokens_at + penalty_tokens.len();
    let mut words = params;
    words.extend(bias_tokens);
    words.extend(bias_values);
    words.extend(penalty_tokens);
    words.extend(penalty_counts);
    PackedRows {
        words,
        bias_tokens: bias_tokens_at,
        bias_values: bias_values_at,
        penalty_tokens: penalty_tokens_at,
        penalty_counts: penalty_counts_at,
        outputs,
        out_len,
        work_rows,
        plain_greedy,
    }
}

/// The results from the kernel's output words; token results are observed by their samplers.
pub(crate) fn unpack(out: &[u32], packed: &PackedRows, rows: &mut [RowSampling<'_>]) -> Vec<SampledRow> {
    let pairs = |offset: usize, n: usize| (0..n).map(move |j| (out[offset + 2 + 2 * j], f32::from_bits(out[offset + 3 + 2 * j])));
    packed
        .outputs
        .iter()
        .zip(rows.iter_mut())
        .map(|(output, r)| match *output {
            RowOutput::Token { offset, logprob, alternatives } => {
                let token = out[offset];
                r.sampler.observe(token);
                let top = pairs(offset, alternatives).map(|(token, logprob)| TokenLogprob { token, logprob }).collect();
                let logprob = if logprob { f32::from_bits(out[offset + 1]) } else { f32::NAN };
                SampledRow::Token(Sampled { token, logprob, top })
            }
            RowOutput::Candidates { offset, n } => {
                let (mut token_ids, mut logits): (Vec<u32>, Vec<f32>) = pairs(offset, n).unzip();
                // A constraint may allow fewer than `n`: the plugin sees only those (as on the host).
                let allowed = logits.iter().take_while(|l| l.is_finite()).count().max(1);
                token_ids.truncate(allowed);
                logits.truncate(allowed);
                SampledRow::Candidates { token_ids, logits }
            }
        })
        .collect()
}

/// One set of the sampler's buffers, grown to the largest step seen. Launches alternate between
/// two sets, so that a launch enqueued while the previous one runs (async scheduling) writes
/// nothing that one still reads: its page-locked uploads and downloads, and its output, which the
/// next batch's fed tokens are read from.
#[derive(Default)]
struct BufferSet {
    /// Page-locked host copies of the uploads (parameters; masks, one slot per sample, written
    /// in place by the threads that compute them), so that each copy is enqueued without waiting
    /// for the stream (the forward still runs) and goes up by DMA as soon as the forward is done.
    staging: Option<PinnedHostSlice<u32>>,
    mask_staging: Option<PinnedHostSlice<u32>>,
    input: Option<CudaSlice<u32>>,
    masks: Option<CudaSlice<u32>>,
    output: Option<CudaSlice<u32>>,
    work: Option<CudaSlice<f32>>,
    /// `greedy_chunks`' best of each chunk (value bits, index) and, per sample, how many of its
    /// chunks are done (zero between launches).
    partials: Option<CudaSlice<u32>>,
    arrivals: Option<CudaSlice<u32>>,
    /// Page-locked copy of the output, downloaded at the end of the launch.
    download: Option<PinnedHostSlice<u32>>,
    /// Recorded after the download: the launch's results are on the host.
    done: Option<CudaEvent>,
}

/// A sampling launched and not yet collected.
struct PendingSample {
    set: usize,
    packed: PackedRows,
    masks: Duration,
    pack: Duration,
}

/// The sampler's buffers and its launches in flight (at most two: see `BufferSet`).
#[derive(Default)]
pub struct SamplingBuffers {
    sets: [BufferSet; 2],
    /// The set the next launch uses.
    next: usize,
    /// Launched and not yet collected, oldest first.
    pending: VecDeque<PendingSample>,
    /// The last launch's set, and the output word of each of its samples' token (`None` for a
    /// sample that returns candidates): where the next batch's fed tokens come from.
    last: Option<(usize, Vec<Option<u32>>)>,
}

impl SamplingBuffers {
    /// The device address of the last launch's output and, for each fed token, the pair (its
    /// index in the batch, its sample's token word there), for `feed_tokens`.
    pub(crate) fn fed_source(&self, dev: &GpuDevice, fed: &[FedToken]) -> Result<(CUdeviceptr, Vec<u32>), CudaError> {
        let missing = || CudaError::Config("a fed token without a previous launch's sample".into());
        let (set, words) = self.last.as_ref().ok_or_else(missing)?;
        let output = self.sets[*set].output.as_ref().ok_or_else(missing)?;
        let mut pairs = Vec::with_capacity(2 * fed.len());
        for f in fed {
            let word = words.get(f.sample).copied().flatten().ok_or_else(missing)?;
            pairs.extend([f.token as u32, word]);
        }
        Ok((ptr(dev, output), pairs))
    }
}

/// Grows `slot` to at least `len` elements (to the next power of two).
fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &GpuDevice,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<(), CudaError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(dev.stream.alloc_zeros::<T>(len.max(1).next_power_of_two())?);
    }
    Ok(())
}

/// Host-side time of one sampling (`launch_sampling`, then `collect_sampling`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SampleTimes {
    /// Advancing the constrained samples' grammars and computing their masks, in parallel
    /// (zero without any): the forward runs meanwhile.
    pub masks: Duration,
    /// Packing the parameters and masks and enqueueing the upload and the kernel.
    pub pack: Duration,
    /// Unpacking the results and advancing the samplers (and their grammars) past the tokens.
    pub unpack: Duration,
}

/// Samples `rows` from the `[num_logit_rows, vocab]` float32 logits at `logits` on the device;
/// only the results come back. The forward that writes the logits may still be running: the
/// constrained samples' masks are computed meanwhile. `timer` marks the uploads' end and the
/// kernel's end.
pub fn sample_on_device(
    dev: &GpuDevice,
    buffers: &mut SamplingBuffers,
    logits: CUdeviceptr,
    num_logit_rows: usize,
    vocab: usize,
    rows: &mut [RowSampling<'_>],
    timer: Option<&ServingStepTimer>,
) -> Result<(Vec<SampledRow>, SampleTimes), CudaError> {
    launch_sampling(dev, buffers, logits, num_logit_rows, vocab, rows, &[], timer)?;
    collect_sampling(buffers, rows)
}

/// Enqueues the sampling of `rows` and the download of its results; `collect_sampling` takes
/// them. `unobserved[i]`: row `i`'s sampler has one token in flight that it has not observed yet
/// (a fed token), so its generator's step is one further on.
#[allow(clippy::too_many_arguments)]
pub fn launch_sampling(
    dev: &GpuDevice,
    buffers: &mut SamplingBuffers,
    logits: CUdeviceptr,
    num_logit_rows: usize,
    vocab: usize,
    rows: &mut [RowSampling<'_>],
    unobserved: &[bool],
    timer: Option<&ServingStepTimer>,
) -> Result<(), CudaError> {
    if buffers.pending.len() >= 2 {
        return Err(CudaError::Config("a third sampling launched before the first was collected".into()));
    }
    if let Some(r) = rows.iter().find(|r| r.row >= num_logit_rows) {
        return Err(CudaError::Config(format!("a sample reads logits row {} of {num_logit_rows}", r.row)));
    }
    let set_index = buffers.next;
    let set = &mut buffers.sets[set_index];
    let masks_started = Instant::now();
    let mask_words = vocab.div_ceil(32);
    // Slots up to the last constrained sample go up (a slot is `mask_words` words).
    let mask_len = rows.iter().rposition(|r| r.sampler.constraint().is_some()).map_or(0, |last| (last + 1) * mask_words);
    if mask_len > 0 {
        grow_pinned(dev, &mut set.mask_staging, rows.len() * mask_words)?;
        grow(dev, &mut set.masks, mask_len)?;
        // This set's last launch was collected (its copies done) before this one began.
        let staging = set.mask_staging.as_mut().unwrap().as_mut_slice()?;
        prepare_constraint_masks(rows, vocab, staging);
        let device = ptr(dev, set.masks.as_ref().unwrap());
        // SAFETY: the device buffer holds `mask_len` words; the staging buffer stays allocated
        // and unwritten until this launch is collected, after the copy.
        unsafe { cudarc::driver::result::memcpy_htod_async(device, &staging[..mask_len], dev.stream.cu_stream())? };
    }
    let masks = if mask_len > 0 { masks_started.elapsed() } else { Duration::ZERO };
    let started = Instant::now();
    let packed = pack_rows(rows, vocab, unobserved, dev.greedy_chunks);
    if !rows.is_empty() {
        let len = packed.words.len();
        grow(dev, &mut set.input, len)?;
        grow(dev, &mut set.output, packed.out_len)?;
        grow(dev, &mut set.work, packed.work_rows * vocab)?;
        grow_pinned(dev, &mut set.staging, len)?;
        grow_pinned(dev, &mut set.download, packed.out_len)?;
        let staging = &mut set.staging.as_mut().unwrap().as_mut_slice()?[..len];
        staging.copy_from_slice(&packed.words);
        let input = set.input.as_mut().unwrap();
        let base = ptr(dev, input);
        // SAFETY: as for the masks above.
        unsafe { cudarc::driver::result::memcpy_htod_async(base, staging, dev.stream.cu_stream())? };
        if let Some(timer) = timer {
            timer.mark(dev, StepMark::SampleStart)?;
        }
        let at = |offset: usize| base + (offset * 4) as u64;
        let output = ptr(dev, set.output.as_ref().unwrap());
        let masks_ptr = set.masks.as_ref().map_or(0, |m| ptr(dev, m));
        let vocab_i = vocab as i32;
        if packed.plain_greedy > 0 {
            let chunks = vocab.div_ceil(GREEDY_CHUNK);
            grow(dev, &mut set.partials, 2 * chunks * rows.len())?;
            grow(dev, &mut set.arrivals, rows.len())?;
            let config = LaunchConfig { grid_dim: (chunks as u32, rows.len() as u32, 1), block_dim: (GREEDY_THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: `partials` holds `chunks` pairs a sample and `arrivals` a zeroed counter a
            // sample (the last block of a launch resets its sample's); outputs as for sample_rows.
            unsafe {
                launchers::greedy_chunks(
                    dev,
                    config,
                    output,
                    ptr(dev, set.partials.as_ref().unwrap()),
                    ptr(dev, set.arrivals.as_ref().unwrap()),
                    logits,
                    base,
                    vocab_i,
                )?;
            }
        }
        if packed.plain_greedy < rows.len() {
            let config = LaunchConfig { grid_dim: (rows.len() as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the packed parameters describe every row's offsets inside these buffers; a
            // row with a mask offset has its slot uploaded.
            unsafe {
                launchers::sample_rows(
                    dev,
                    config,
                    output,
                    ptr(dev, set.work.as_ref().unwrap()),
                    logits,
                    base,
                    at(packed.bias_tokens),
                    at(packed.bias_values),
                    at(packed.penalty_tokens),
                    at(packed.penalty_counts),
                    masks_ptr,
                    vocab_i,
                )?;
            }
        }
        if let Some(timer) = timer {
            timer.mark(dev, StepMark::SampleEnd)?;
        }
        let download = &mut set.download.as_mut().unwrap().as_mut_slice()?[..packed.out_len];
        // SAFETY: the page-locked buffer holds `out_len` words and is read only once `done` has
        // passed (`collect_sampling`), and written again only by this set's next launch.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(download, output, dev.stream.cu_stream())? };
    }
    // Recorded even with nothing to sample (a step of prefill chunks): `collect_sampling` waits
    // for it, so a collected launch has finished everything enqueued before it, the forward
    // included, and the host buffers it used may be written again.
    match &set.done {
        Some(done) => done.record(&dev.stream)?,
        None => set.done = Some(dev.stream.record_event(None)?),
    }
    let words = packed
        .outputs
        .iter()
        .map(|o| match *o {
            RowOutput::Token { offset, .. } => Some(offset as u32),
            RowOutput::Candidates { .. } => None,
        })
        .collect();
    buffers.last = Some((set_index, words));
    buffers.next = 1 - set_index;
    buffers.pending.push_back(PendingSample { set: set_index, packed, masks, pack: started.elapsed() });
    Ok(())
}

/// Waits for the oldest launched sampling and returns its results; `rows` are its samplers, in
/// the launch's order (token results are observed by them).
pub fn collect_sampling(buffers: &mut SamplingBuffers, rows: &mut [RowSampling<'_>]) -> Result<(Vec<SampledRow>, SampleTimes), CudaError> {
    let pending = buffers.pending.pop_front().ok_or_else(|| CudaError::Config("collect without a launched sampling".into()))?;
    if pending.packed.outputs.len() != rows.len() {
        return Err(CudaError::Config(format!("{} rows collected for a launch of {}", rows.len(), pending.packed.outputs.len())));
    }
    let times = SampleTimes { masks: pending.masks, pack: pending.pack, unpack: Duration::ZERO };
    let set = &mut buffers.sets[pending.set];
    set.done.as_ref().expect("recorded at launch").synchronize()?;
    if rows.is_empty() {
        return Ok((Vec::new(), times));
    }
    let unpacking = Instant::now();
    let out = &set.download.as_mut().expect("grown at launch").as_mut_slice()?[..pending.packed.out_len];
    let results = unpack(out, &pending.packed, rows);
    Ok((results, SampleTimes { unpack: unpacking.elapsed(), ..times }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{SamplingParams, SequenceSampler};

    #[test]
    fn parameters_and_csr_arrays_pack_per_row() {
        let plain = SamplingParams { temperature: 0.7, top_k: 50, top_p: 0.9, seed: Some(7), ..Default::default() };
        let penalised = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.3,
            frequency_penalty: 0.5,
            logit_bias: [(3, 2.0), (9, -1.0), (99, 5.0)].into(),
            logprobs: Some(3),
            ..Default::default()
        };
        let mut a = SequenceSampler::new(plain.clone(), &[1, 2], 0);
        let mut b = SequenceSampler::new(penalised, &[4, 2, 4], 0);
        b.observe(2);
        b.observe(5);
        b.observe(5);
        let mut c = SequenceSampler::new(SamplingParams { top_k: 1000, ..plain }, &[], 1);
        let rows = vec![
            RowSampling { row: 1, sampler: &mut a, candidates: None },
            RowSampling { row: 0, sampler: &mut b, candidates: None },
            RowSampling { row: 1, sampler: &mut c, candidates: Some(4) },
        ];
        let p = pack_rows(&rows, 60, &[], true);
        let w = |row: usize, word: usize| p.words[row * PARAM_WORDS + word];
        assert_eq!((w(0, word::ROW), w(1, word::ROW), w(2, word::ROW)), (1, 0, 1));
        assert_eq!(w(0, word::FLAGS), 0, "no bias or penalties: the raw row is read in place");
        assert_eq!(w(1, word::FLAGS), F_GREEDY | F_MODIFIED | F_LOGPROB);
        assert_eq!(w(2, word::FLAGS), F_CANDIDATES);
        assert_eq!(f32::from_bits(w(0, word::TEMPERATURE)), 0.7);
        assert_eq!((w(0, word::TOP_K), w(2, word::TOP_K)), (50, 0), "a top-k past the vocabulary is no cut");
        assert_eq!((w(0, word::SEED), w(0, word::SEED + 1)), (7, 0));
        assert_ne!(w(2, word::SEED), 7, "the second sample of a seeded request draws apart");
        assert_eq!((w(1, word::STEP), w(0, word::STEP)), (3, 0));
        let fed = pack_rows(&rows, 60, &[true, false], true);
        let step = |row: usize| fed.words[row * PARAM_WORDS + word::STEP];
        assert_eq!((step(0), step(1)), (1, 3), "a fed row draws at the step after its observed tokens");
        // Bias: token 99 is outside the vocabulary of 60 and dropped.
        assert_eq!((w(1, word::BIAS), w(1, word::BIAS + 1)), (0, 2));
        assert_eq!(&p.words[p.bias_tokens..p.bias_values], &[3, 9]);
        assert_eq!(f32::from_bits(p.words[p.bias_values + 1]), -1.0);
        // Penalties: prompt {2, 4} and output {2: 1, 5: 2}, each token once.
        let (begin, end) = (w(1, word::PENALTY) as usize, w(1, word::PENALTY + 1) as usize);
        let mut entries: Vec<(u32, u32)> = (begin..end)
            .map(|i| (p.words[p.penalty_tokens + i], p.words[p.penalty_counts + i]))
            .collect();
        entries.sort();
        assert_eq!(entries, vec![(2, 1), (4, 0), (5, 2)]);
        assert_eq!(p.work_rows, 1);
        assert_eq!(p.plain_greedy, 0, "greedy with penalties and log-probs is sample_rows' sample");
        assert_eq!(w(1, word::WORK), 0);
        // Outputs: 2 words, then 3 alternatives, then 4 candidates.
        assert_eq!(
            p.outputs,
            vec![
                RowOutput::Token { offset: 0, logprob: false, alternatives: 0 },
                RowOutput::Token { offset: 2, logprob: true, alternatives: 3 },
                RowOutput::Candidates { offset: 10, n: 4 },
            ]
        );
        assert_eq!((w(1, word::LOGPROBS), w(2, word::TOP_N), w(2, word::OUT)), (3, 4, 10));
        assert_eq!(p.out_len, 20);
        assert_eq!(p.words.len(), 3 * PARAM_WORDS + 2 + 2 + 3 + 3);
    }

    #[test]
    fn unpacking_observes_tokens_but_not_candidates() {
        let lp = SamplingParams { logprobs: Some(1), ..Default::default() };
        let mut a = SequenceSampler::new(lp, &[], 0);
        let mut b = SequenceSampler::new(SamplingParams::default(), &[], 0);
        let mut rows = vec![
            RowSampling { row: 0, sampler: &mut a, candidates: None },
            RowSampling { row: 0, sampler: &mut b, candidates: Some(2) },
        ];
        let packed = pack_rows(&rows, 8, &[], true);
        let out = [5, (-0.5f32).to_bits(), 5, (-0.5f32).to_bits(), u32::MAX, f32::NAN.to_bits(), 6, 3f32.to_bits(), 1, 2f32.to_bits()];
        let got = unpack(&out, &packed, &mut rows);
        let top = vec![TokenLogprob { token: 5, logprob: -0.5 }];
        assert_eq!(got[0], SampledRow::Token(Sampled { token: 5, logprob: -0.5, top }));
        assert_eq!(got[1], SampledRow::Candidates { token_ids: vec![6, 1], logits: vec![3.0, 2.0] });
        assert_eq!((a.num_observed(), b.num_observed()), (1, 0));
        assert_eq!(a.output_counts().get(&5), Some(&1));
    }

    #[test]
    fn parameter_words_match_the_kernel() {
        let source = pagedserve_kernels::MODULES.iter().find(|m| m.name == "sampling").unwrap().source;
        assert!(source.contains(&format!("#define SAMPLE_PARAM_WORDS {PARAM_WORDS}")));
        assert!(source.contains(&format!("#define MAX_LIST {MAX_LIST}")));
        for (name, value) in [("P_OUT", word::OUT), ("P_WORK", word::WORK), ("P_TOP_N", word::TOP_N), ("P_STEP_LO", word::STEP)] {
            assert!(source.contains(&format!("#define {name} {value}\n")), "{name}");
        }
        assert!(source.contains(&format!("#define F_MODIFIED {F_MODIFIED}u")));
        assert!(source.contains(&format!("#define F_CHUNKED {F_CHUNKED}u")));
        assert!(source.contains(&format!("#define GREEDY_CHUNK {GREEDY_CHUNK}\n")));
        assert!(source.contains(&format!("#define GREEDY_THREADS {GREEDY_THREADS}\n")));
    }

    #[test]
    fn only_greedy_samples_with_nothing_else_asked_go_to_the_chunked_argmax() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let mut plain = SequenceSampler::new(greedy.clone(), &[], 0);
        let mut biased = SequenceSampler::new(SamplingParams { logit_bias: [(1, 1.0)].into(), ..greedy.clone() }, &[], 0);
        let mut logprobs = SequenceSampler::new(SamplingParams { logprobs: Some(0), ..greedy.clone() }, &[], 0);
        let mut random = SequenceSampler::new(SamplingParams { temperature: 0.5, ..Default::default() }, &[], 0);
        let mut plain_too = SequenceSampler::new(greedy, &[], 1);
        let rows = vec![
            RowSampling { row: 0, sampler: &mut plain, candidates: None },
            RowSampling { row: 1, sampler: &mut biased, candidates: None },
            RowSampling { row: 2, sampler: &mut logprobs, candidates: None },
            RowSampling { row: 3, sampler: &mut random, candidates: None },
            RowSampling { row: 4, sampler: &mut plain_too, candidates: Some(3) },
        ];
        let p = pack_rows(&rows, 10, &[], true);
        let flags: Vec<u32> = (0..5).map(|i| p.words[i * PARAM_WORDS + word::FLAGS]).collect();
        assert_eq!(flags, vec![F_GREEDY | F_CHUNKED, F_GREEDY | F_MODIFIED, F_GREEDY | F_LOGPROB, 0, F_CANDIDATES]);
        assert_eq!(p.plain_greedy, 1);
        let unchunked = pack_rows(&rows, 10, &[], false);
        assert_eq!((unchunked.words[word::FLAGS], unchunked.plain_greedy), (F_GREEDY, 0), "PAGEDSERVE_GREEDY_CHUNKS=off: sample_rows takes it");
    }
}
