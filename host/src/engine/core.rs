//! The engine core: one `step` schedules a batch, runs the model, samples, and turns new tokens
//! into stream events. It owns the scheduler, the KV-cache manager, the backend and every live
//! request; it runs on the engine thread and never awaits.
//!
//! Requests and sequences: a request has `n` samples; each sample is a sequence in the scheduler.
//! A request starts as one sequence; when its prompt is prefilled, the other `n - 1` samples are
//! forked from it and share its prompt blocks (copy-on-write), each drawing its first token from
//! the same logits with its own generator.
//!
//! Sampling happens in the backend (`ModelBackend::forward_sampled`: on the device for CUDA, so
//! only tokens cross to the host); the engine keeps each sample's sampler (parameters, penalty
//! counts, generator) and hands the backend one `RowSampling` per sample of the step.
//!
//! Sampler plugins: a request naming one (`sampler`) has its tokens picked by that plugin. The
//! backend applies the request's logit bias and penalties and returns the top-N candidates of
//! each such sequence; the engine calls each plugin once per step for all its sequences. A plugin fault fails only
//! the requests of that call (an `Error` event, their blocks freed); the rest of the batch goes on.
//!
//! Constraint plugins: a request naming one (`constraint`) has the tokens it may take next decided
//! by that plugin. Before each forward, the engine asks each plugin once for all its sequences
//! that sample in the step (`fetch_constraint_masks`) and sets the masks on their samplers, which
//! every sampling path then applies; a fault fails the requests of that call, after the forward.
//!
//! Async scheduling (with a pipelined backend and `async_scheduling` on): step N+1 is scheduled
//! and launched while step N runs on the device, and step N's results are taken after it, so the
//! host's work between two steps (processing, scheduling, building the batch) overlaps the GPU.
//! Each decode sequence of step N gets a placeholder token, which the backend replaces with the
//! token step N sampled (`runner::FedToken`) before step N+1 reads it; the engine writes the
//! token in when step N's results come. A sequence that step N ends (an end-of-sequence token, a
//! stop string) has its step N+1 token dropped; one that would end by length gets no placeholder.
//! Only a step whose samples all depend on nothing but their last token is pipelined (native
//! samplers without penalties or constraints, no forks); any other waits for its results before
//! the next is scheduled, exactly as without async scheduling.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::output::{TextStream, TokenEnds, TokenOutcome};
use super::request::{FinishReason, GenerateRequest, RequestId, RequestTimings, StreamEvent, Usage};
use super::EngineError;
use crate::kv_cache::KvCacheManager;
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::plugin::{ConstraintStart, ConstraintStep, PluginKind, PluginRegistry, PluginSampleInput};
use crate::runner::{ForwardBatch, ModelBackend, PLACEHOLDER_TOKEN};
use crate::sampling::{RowSampling, Sampled, SampledRow, SequenceSampler};
use crate::sched::{SchedSeq, Scheduler, SchedulerOutput, SchedulingPolicy, SeqId};
use crate::tokenizer::Tokenizer;

struct RequestState {
    events: UnboundedSender<StreamEvent>,
    request: GenerateRequest,
    /// Sequence of each sample; a sample not yet forked has no entry.
    samples: Vec<SeqId>,
    finished_samples: usize,
    completion_tokens: usize,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
}

/// One sample of a step, planned before the forward (see `EngineCore::plan_samples`).
struct PlannedSample {
    seq: SeqId,
    /// Its row in the batch's logits.
    row: usize,
    /// A sample forked this step: its parent, and its state (added once the forward succeeded).
    fork: Option<(SeqId, SampleState)>,
    /// The sampler plugin that picks its token and the candidates it wants, or why the sample
    /// cannot be taken (a sampler or constraint plugin failed, or refused the request).
    plugin: Option<Result<(String, usize), EngineError>>,
}

/// A launched step whose results have not been taken yet.
struct InFlight {
    output: SchedulerOutput,
    plan: Vec<PlannedSample>,
    /// For each plan entry, whether it was handed to the backend (a sample whose plugin failed is
    /// not: it has no row).
    sampled: Vec<bool>,
    /// The results, when the step ran to the end at launch (a backend without pipelining, or a
    /// launch that failed).
    ready: Option<Result<Vec<SampledRow>, ModelError>>,
    /// Whether the next step may be launched before this one's results are in.
    pipelinable: bool,
    /// Whether `Scheduler::advance` has counted its tokens as computed (they are committed to
    /// the KV-cache manager once it succeeds).
    computed: bool,
    /// For each plan entry, whether its sequence holds a placeholder for this step's token.
    placeholders: Vec<bool>,
    /// Host time spent launching (and, without pipelining, running) it.
    forward_time: std::time::Duration,
}

struct SampleState {
    request: RequestId,
    index: usize,
    sampler: SequenceSampler,
    text: TextStream,
    last_token_at: Option<Instant>,
}

/// The engine's state at one moment between steps (`EngineHandle::snapshot`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineSnapshot {
    /// Each KV block's state: 0 free, 1 used, 2 free with a cached prefix (`kv_cache::block_pool`).
    pub blocks: Vec<u8>,
    pub block_size: usize,
    /// Requests that have started (prefilling or decoding).
    pub running: usize,
    /// Requests not scheduled yet.
    pub waiting: usize,
    /// The scheduling policy in use.
    pub policy: String,
}

pub struct EngineCore {
    backend: Box<dyn ModelBackend>,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
    scheduler: Scheduler,
    kv: KvCacheManager,
    requests: HashMap<RequestId, RequestState>,
    samples: HashMap<SeqId, SampleState>,
    next_seq: SeqId,
    next_arrival: u64,
    max_model_len: usize,
    /// End-of-sequence tokens of the model (honoured unless `ignore_eos`).
    eos_tokens: Vec<u32>,
    last_prefix_stats: crate::kv_cache::PrefixCacheStats,
    plugins: Option<Arc<PluginRegistry>>,
    /// Per constraint plugin, the sequences it has been asked about (so that it hears when they
    /// are over).
    constraint_seqs: BTreeMap<String, HashSet<SeqId>>,
    /// Why the last forward pass failed, if it did (cleared by the next that succeeds): the
    /// server reports itself unhealthy meanwhile.
    forward_failure: Option<String>,
    /// Whether steps are pipelined (see the module header): asked for and the backend can.
    async_scheduling: bool,
    /// The launched step whose results the next `step` takes.
    in_flight: Option<InFlight>,
}

/// Tokens of a sequence's recent past a sampler plugin sees.
const PLUGIN_RECENT_TOKENS: usize = 64;

impl EngineCore {
    pub fn new(
        backend: Box<dyn ModelBackend>,
        tokenizer: Arc<Tokenizer>,
        metrics: Arc<Metrics>,
        scheduler: Scheduler,
        prefix_caching: bool,
        max_model_len: usize,
    ) -> Self {
        let layout = *backend.kv_layout();
        let window = backend.config().all_layers_sliding();
        let eos_tokens = tokenizer.eos_token_ids().to_vec();
        EngineCore {
            backend,
            tokenizer,
            metrics,
            scheduler,
            kv: KvCacheManager::new(layout.num_blocks, layout.block_size, prefix_caching)
                .with_sliding_window(window),
            requests: HashMap::new(),
            samples: HashMap::new(),
            next_seq: 0,
            next_arrival: 0,
            max_model_len,
            eos_tokens,
            last_prefix_stats: Default::default(),
            plugins: None,
            constraint_seqs: BTreeMap::new(),
            forward_failure: None,
            async_scheduling: false,
            in_flight: None,
        }
    }

    /// Turns async scheduling on (where the backend pipelines) or off.
    pub fn set_async_scheduling(&mut self, on: bool) {
        self.async_scheduling = on && self.backend.pipelined();
    }

    /// Why the last forward pass failed, while no later one has succeeded.
    pub fn forward_failure(&self) -> Option<&str> {
        self.forward_failure.as_deref()
    }

    pub fn has_work(&self) -> bool {
        !self.scheduler.is_empty() || self.in_flight.is_some()
    }

    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    pub fn num_waiting_requests(&self) -> usize {
        self.requests.values().filter(|r| r.first_scheduled.is_none()).count()
    }

    pub fn kv_usage(&self) -> f64 {
        self.kv.usage()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.kv.num_free_blocks()
    }

    /// (tokens whose keys and values are cached, slots of the blocks sequences hold): how much of
    /// the allocated KV memory holds real tokens. Counts a block shared by forks once per holder's
    /// tokens, so it is exact for requests with `n = 1`.
    pub fn kv_occupancy(&self) -> (usize, usize) {
        let tokens = self.scheduler.seqs().filter(|s| s.blocks.num_blocks() > 0).map(|s| s.num_computed).sum();
        let slots = (self.kv.num_blocks() - self.kv.num_free_blocks()) * self.kv.block_size();
        (tokens, slots)
    }

    /// What the engine holds now, for the dashboard.
    pub fn snapshot(&self) -> EngineSnapshot {
        EngineSnapshot {
            blocks: self.kv.block_states(),
            block_size: self.kv.block_size(),
            running: self.num_requests() - self.num_waiting_requests(),
            waiting: self.num_waiting_requests(),
            policy: self.policy_name().to_string(),
        }
    }

    pub fn set_policy(&mut self, policy: Box<dyn SchedulingPolicy>) -> Box<dyn SchedulingPolicy> {
        self.scheduler.set_policy(policy)
    }

    pub fn policy_name(&self) -> &str {
        self.scheduler.policy_name()
    }

    pub fn set_plugins(&mut self, plugins: Arc<PluginRegistry>) {
        self.plugins = Some(plugins);
    }

    pub fn add_request(&mut self, id: RequestId, request: GenerateRequest, events: UnboundedSender<StreamEvent>) {
        // The plugins a request names are pinned while it is in the engine: the admin API cannot
        // remove them from under it (`unpin_plugins` when it ends).
        let mut pinned = Vec::new();
        let named = [(PluginKind::Sampler, request.sampler.as_deref()), (PluginKind::Constraint, request.constraint.as_ref().and_then(|c| c.plugin_name()))];
        for (kind, name) in named {
            let Some(name) = name else { continue };
            if !self.plugins.as_ref().is_some_and(|p| p.pin(kind, name)) {
                for &(kind, name) in &pinned {
                    self.plugins.as_ref().expect("pinned in the registry").unpin(kind, name);
                }
                let _ = events.send(StreamEvent::Error(EngineError::Plugin(format!("no {kind} plugin `{name}` is loaded"))));
                self.metrics.request_failure.with_label_values(&["plugin"]).inc();
                return;
            }
            pinned.push((kind, name));
        }
        let seq_id = self.new_seq_id();
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let seq = SchedSeq::new(
            seq_id,
            request.prompt_tokens.clone(),
            request.max_tokens,
            request.priority,
            request.tenant.clone(),
            arrival,
        );
        self.samples.insert(seq_id, self.sample_state(id, 0, &request));
        self.scheduler.add(seq);
        self.requests.insert(
            id,
            RequestState {
                events,
                request,
                samples: vec![seq_id],
                finished_samples: 0,
                completion_tokens: 0,
                arrival: Instant::now(),
                first_scheduled: None,
                first_token: None,
            },
        );
    }

    fn new_seq_id(&mut self) -> SeqId {
        self.next_seq += 1;
        self.next_seq
    }

    fn sample_state(&self, request: RequestId, index: usize, r: &GenerateRequest) -> SampleState {
        SampleState {
            request,
            index,
            sampler: SequenceSampler::new(r.sampling.clone(), &r.prompt_tokens, index as u64).with_constraint(r.constraint.clone()),
            text: TextStream::new(
                &self.tokenizer,
                &r.prompt_tokens,
                r.skip_special_tokens,
                r.stop.clone(),
                r.include_stop_str_in_output,
            ),
            last_token_at: None,
        }
    }

    /// Drops a request (client gone): its sequences leave and their blocks return to the pool.
    pub fn abort(&mut self, id: RequestId) {
        self.end_early(id, FinishReason::Abort);
    }

    /// Ends a request before it finished, counted under `reason` (a success: the client went, or
    /// a filter stopped the output): its sequences leave and their blocks return to the pool. A
    /// request already gone is ignored.
    pub fn end_early(&mut self, id: RequestId, reason: FinishReason) {
        if let Some(state) = self.release(id) {
            self.metrics.e2e_request_latency.observe(state.arrival.elapsed().as_secs_f64());
            self.metrics.request_success.with_label_values(&[reason.as_str()]).inc();
        }
    }

    /// Takes a request out of the engine, counting nothing: its sequences leave and their blocks
    /// return to the pool.
    fn release(&mut self, id: RequestId) -> Option<RequestState> {
        let state = self.requests.remove(&id)?;
        self.unpin_plugins(&state.request);
        for &seq in &state.samples {
            self.scheduler.remove(seq, &mut self.kv);
            self.samples.remove(&seq);
        }
        self.metrics.kv_cache_usage_perc.set(self.kv.usage());
        Some(state)
    }

    /// The plugins `request` named (pinned by `add_request`) are no longer in use by it.
    fn unpin_plugins(&self, request: &GenerateRequest) {
        let Some(plugins) = &self.plugins else { return };
        if let Some(name) = &request.sampler {
            plugins.unpin(PluginKind::Sampler, name);
        }
        if let Some(name) = request.constraint.as_ref().and_then(|c| c.plugin_name()) {
            plugins.unpin(PluginKind::Constraint, name);
        }
    }

    /// Fails every request (the engine is going down).
    pub fn fail_all(&mut self, error: EngineError) {
        // Its results would go to requests that are about to end.
        self.in_flight = None;
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail_request(id, error.clone());
        }
    }

    /// One engine step. Returns the number of tokens computed (0: nothing to do).
    pub fn step(&mut self) -> usize {
        self.step_then(|_| {})
    }

    /// `step`, calling `scheduled` once the step's batch is chosen and its requests are marked
    /// scheduled, before the forward pass and before any of the step's output is sent: the engine
    /// thread publishes its waiting count there, so a client that has seen its first token never
    /// finds its request still counted against `--max-queue`.
    ///
    /// With a step in flight (async scheduling), this schedules and launches the next one first
    /// and then takes the results of the one in flight.
    pub fn step_then(&mut self, scheduled: impl FnOnce(&Self)) -> usize {
        let mut previous = self.in_flight.take();
        let mut feed = HashMap::new();
        if let Some(previous) = &mut previous {
            // Its tokens are computed once it runs; the next step starts after them.
            self.scheduler.advance(&previous.output);
            previous.computed = true;
            feed = self.add_placeholders(previous);
        }
        let launched = self.schedule_and_launch(scheduled, &feed);
        let tokens = launched.as_ref().map_or(0, |l| l.output.num_tokens);
        let had_previous = previous.is_some();
        let previous_tokens = previous.as_ref().map_or(0, |p| p.output.num_tokens);
        // The health check sees a failure of any step this call took results of, not only the
        // last one's.
        let mut completed = 0;
        let mut failure = None;
        if let Some(previous) = previous {
            completed += 1;
            failure = self.complete(previous).or(failure);
        }
        match launched {
            Some(step) if step.pipelinable => self.in_flight = Some(step),
            Some(step) => {
                completed += 1;
                failure = self.complete(step).or(failure);
            }
            None if !had_previous => self.fail_unschedulable(),
            None => {}
        }
        if completed > 0 {
            self.forward_failure = failure;
        }
        self.update_gauges();
        // A step that only took the last one's results still did work.
        tokens.max(previous_tokens)
    }

    /// Schedules a batch and launches it; `None` when nothing could be scheduled. `feed` maps a
    /// sequence holding a placeholder to its sample in the step in flight.
    fn schedule_and_launch(&mut self, scheduled: impl FnOnce(&Self), feed: &HashMap<SeqId, usize>) -> Option<InFlight> {
        let metrics = self.metrics.clone();
        let phase = |name: &str, since: Instant| {
            metrics.engine_step_phase.with_label_values(&[name]).observe(since.elapsed().as_secs_f64())
        };
        let started = Instant::now();
        let output = self.scheduler.schedule(&mut self.kv);
        if let Some(fault) = &output.policy_fault {
            tracing::warn!(policy = self.scheduler.policy_name(), %fault, "scheduling policy fault; used FCFS");
            self.metrics
                .scheduler_policy_faults
                .with_label_values(&[self.scheduler.policy_name(), fault.reason()])
                .inc();
        }
        self.metrics.num_preemptions.inc_by(output.preempted.len() as u64);
        if output.scheduled.is_empty() {
            return None;
        }
        let now = Instant::now();
        for scheduled in &output.scheduled {
            let request = self.samples[&scheduled.id].request;
            let state = self.requests.get_mut(&request).expect("live request");
            if state.first_scheduled.is_none() {
                state.first_scheduled = Some(now);
                self.metrics.request_queue_time.observe((now - state.arrival).as_secs_f64());
            }
        }
        let mut plan = self.plan_samples(&output);
        scheduled(self);
        // Published before the forward, which can take seconds on the CPU: /metrics shows this
        // step's batch while it runs, not the last one's. Only when the batch changed (a prefill
        // joined it, or a sequence was preempted): a steady decode batch is what the last
        // step's end published, and the count walks every request.
        let has_prefill = output.num_tokens > output.scheduled.len();
        if has_prefill || !output.preempted.is_empty() {
            self.update_gauges();
        }
        phase("schedule", started);
        if !self.constraint_seqs.is_empty() || plan.iter().any(|p| self.plugin_constrained(p)) {
            let asked = Instant::now();
            self.fetch_constraint_masks(&mut plan);
            phase("constraint_plugins", asked);
        }
        let forward_started = Instant::now();
        let mut step = self.launch(output, plan, feed);
        step.forward_time = forward_started.elapsed();
        // The host's part of the forward: building the batch and enqueueing it (with async
        // scheduling; without, the whole forward).
        phase("launch", forward_started);
        Some(step)
    }

    /// Takes a launched step's results (waiting for them if they are not in) and emits them; a
    /// failed step fails its requests, and its error is returned.
    fn complete(&mut self, mut step: InFlight) -> Option<String> {
        let metrics = self.metrics.clone();
        let waited = Instant::now();
        let results = match step.ready.take() {
            Some(results) => results,
            None => {
                let gone = step.plan.iter().filter(|p| p.fork.is_none() && !self.samples.contains_key(&p.seq)).count();
                let mut spares: Vec<SequenceSampler> =
                    (0..gone).map(|_| SequenceSampler::new(Default::default(), &[], 0)).collect();
                let (mut rows, _) = sampling_rows(&mut self.samples, &mut step.plan, &mut spares);
                self.backend.collect(&mut rows)
            }
        };
        let forward_time = step.forward_time + waited.elapsed();
        metrics.engine_step_phase.with_label_values(&["forward"]).observe(forward_time.as_secs_f64());
        // The backend's own breakdown of the forward (grammar masks, sampling, device times);
        // a failed step has none of its own.
        if results.is_ok() {
            for &(name, time) in self.backend.step_phases() {
                metrics.engine_step_phase.with_label_values(&[name]).observe(time.as_secs_f64());
            }
        }
        let failure = results.as_ref().err().map(|e| e.to_string());
        match results {
            Ok(results) => {
                let process_started = Instant::now();
                if step.computed {
                    self.scheduler.commit(&step.output, &mut self.kv);
                } else {
                    self.scheduler.step_done(&step.output, &mut self.kv);
                }
                let mut results = results.into_iter();
                let results = step.sampled.iter().map(|&s| if s { results.next() } else { None }).collect();
                self.process_samples(step.plan, results, &step.placeholders);
                metrics.engine_step_phase.with_label_values(&["process"]).observe(process_started.elapsed().as_secs_f64());
            }
            Err(error) => {
                tracing::error!(%error, "forward pass failed");
                // A request may have ended meanwhile (its client left, or an earlier step ended it).
                let mut requests: Vec<RequestId> =
                    step.output.scheduled.iter().filter_map(|s| self.samples.get(&s.id)).map(|s| s.request).collect();
                requests.dedup();
                for id in requests {
                    if let Some(state) = self.requests.get(&id) {
                        let _ = state.events.send(StreamEvent::Error(EngineError::Forward(error.to_string())));
                    }
                    self.abort(id);
                }
            }
        }
        self.metrics.iteration_tokens.observe(step.output.num_tokens as f64);
        failure
    }

    /// Appends a placeholder token to each sequence of the step in flight that goes on after
    /// it (one that the step's token ends by length gets none); returns each such sequence's
    /// sample index in that step.
    fn add_placeholders(&mut self, step: &mut InFlight) -> HashMap<SeqId, usize> {
        let mut feed = HashMap::new();
        // A pipelined step has no forks and no plugins: its plan entries are its rows, in order.
        for (i, p) in step.plan.iter().enumerate() {
            let Some(sample) = self.samples.get(&p.seq) else { continue };
            let Some(seq) = self.scheduler.get_mut(p.seq) else { continue };
            let request = &self.requests[&sample.request].request;
            let ends_by_length = seq.num_generated() + 1 >= request.max_tokens || seq.tokens.len() + 1 >= self.max_model_len;
            if ends_by_length || !seq.running {
                continue;
            }
            seq.tokens.push(PLACEHOLDER_TOKEN);
            step.placeholders[i] = true;
            feed.insert(p.seq, i);
        }
        feed
    }

    /// Whether a planned sample depends on nothing but its sequence's last token, so that the
    /// next step may be launched before its result is known.
    fn pipelinable(&self, p: &PlannedSample) -> bool {
        if p.fork.is_some() || p.plugin.is_some() {
            return false;
        }
        let sampler = &self.samples[&p.seq].sampler;
        sampler.constraint().is_none() && !sampler.params().has_penalties()
    }

    /// This step's samples, in the order they are emitted: for each sequence that samples, the
    /// other `n - 1` samples of a request whose prompt was just prefilled (forked once the
    /// forward succeeds), then the sequence itself.
    fn plan_samples(&mut self, output: &SchedulerOutput) -> Vec<PlannedSample> {
        let mut plan = Vec::new();
        for (row, s) in output.scheduled.iter().filter(|s| s.samples).enumerate() {
            let request_id = self.samples[&s.id].request;
            let state = &self.requests[&request_id];
            let plugin = state
                .request
                .sampler
                .as_ref()
                .map(|name| self.plugin_top_n(name).map(|n| (name.clone(), n)).map_err(EngineError::Plugin));
            if state.samples.len() < state.request.n {
                let request = state.request.clone();
                for index in 1..request.n {
                    let child = self.new_seq_id();
                    let fork = Some((s.id, self.sample_state(request_id, index, &request)));
                    plan.push(PlannedSample { seq: child, row, fork, plugin: plugin.clone() });
                }
            }
            plan.push(PlannedSample { seq: s.id, row, fork: None, plugin });
        }
        plan
    }

    /// Whether a planned sample's tokens are constrained by a plugin.
    fn plugin_constrained(&self, p: &PlannedSample) -> bool {
        let sampler = match &p.fork {
            Some((_, state)) => &state.sampler,
            None => &self.samples[&p.seq].sampler,
        };
        sampler.constraint().is_some_and(|c| c.plugin_name().is_some())
    }

    /// Asks each constraint plugin, once for all its sequences that sample in this step, which
    /// tokens may come next, and sets the answers on their samplers; tells it which of its
    /// sequences are over. A sample whose plugin failed, or refused to start it, is marked failed
    /// (its request fails after the forward, which its sequence is already part of).
    fn fetch_constraint_masks(&mut self, plan: &mut [PlannedSample]) {
        let mut asking: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, p) in plan.iter().enumerate() {
            if matches!(p.plugin, Some(Err(_))) {
                continue;
            }
            let sampler = match &p.fork {
                Some((_, state)) => &state.sampler,
                None => &self.samples[&p.seq].sampler,
            };
            if let Some(name) = sampler.constraint().filter(|c| c.needs_mask()).and_then(|c| c.plugin_name()) {
                asking.entry(name.to_string()).or_default().push(i);
            }
        }
        if asking.is_empty() && self.constraint_seqs.is_empty() {
            return;
        }
        let mask_width = self.backend.config().vocab_size;
        let vocab = mask_width.min(self.tokenizer.vocab_size()) as u32;
        let names: BTreeSet<String> = asking.keys().chain(self.constraint_seqs.keys()).cloned().collect();
        for name in names {
            let indices = asking.remove(&name).unwrap_or_default();
            let known = self.constraint_seqs.remove(&name).unwrap_or_default();
            let (mut alive, ended): (HashSet<SeqId>, Vec<SeqId>) = {
                let (alive, ended): (Vec<SeqId>, Vec<SeqId>) = known.into_iter().partition(|id| self.samples.contains_key(id));
                (alive.into_iter().collect(), ended)
            };
            if indices.is_empty() && ended.is_empty() {
                if !alive.is_empty() {
                    self.constraint_seqs.insert(name, alive);
                }
                continue;
            }
            let steps: Vec<ConstraintStep> = indices
                .iter()
                .map(|&i| {
                    let p = &plan[i];
                    // A fork's first token follows its parent's prompt.
                    let source = p.fork.as_ref().map_or(p.seq, |(parent, _)| *parent);
                    let seq = self.scheduler.get(source).expect("a scheduled sequence");
                    ConstraintStep {
                        seq: p.seq,
                        recent_tokens: seq.tokens[seq.tokens.len().saturating_sub(PLUGIN_RECENT_TOKENS)..].to_vec(),
                        generated_tokens: seq.num_generated() as u32,
                    }
                })
                .collect();
            let requests: HashMap<SeqId, RequestId> = indices
                .iter()
                .map(|&i| (plan[i].seq, plan[i].fork.as_ref().map_or_else(|| self.samples[&plan[i].seq].request, |(_, s)| s.request)))
                .collect();
            let start = |seq: SeqId| {
                let request = &self.requests[&requests[&seq]].request;
                let (config, eos_token) = match request.constraint.as_ref().map(|c| (c.spec(), c.eos())) {
                    Some((crate::constraint::ConstraintSpec::Plugin { config, .. }, eos)) => (config.clone(), eos),
                    _ => (String::new(), 0),
                };
                ConstraintStart { prompt_tokens: request.prompt_tokens.clone(), config, eos_token }
            };
            let result = match self.plugins.as_ref().and_then(|p| p.constraint(&name)) {
                Some(slot) => slot.constraint_step(&ended, &steps, start, vocab, mask_width).map_err(|e| e.to_string()),
                None => Err(format!("constraint plugin `{name}` is not loaded")),
            };
            match result {
                Ok(masks) => {
                    for (&i, mask) in indices.iter().zip(masks) {
                        match mask {
                            Ok(allowed) => {
                                let p = &mut plan[i];
                                let sampler = match &mut p.fork {
                                    Some((_, state)) => &mut state.sampler,
                                    None => &mut self.samples.get_mut(&p.seq).expect("a live sample").sampler,
                                };
                                sampler.constraint_mut().expect("a constrained sample").set_allowed(allowed);
                                alive.insert(p.seq);
                            }
                            Err(message) => {
                                plan[i].plugin = Some(Err(EngineError::PluginRefused(format!("constraint plugin `{name}`: {message}"))))
                            }
                        }
                    }
                }
                Err(message) => {
                    for &i in &indices {
                        plan[i].plugin = Some(Err(EngineError::Plugin(message.clone())));
                    }
                }
            }
            if !alive.is_empty() {
                self.constraint_seqs.insert(name, alive);
            }
        }
    }

    /// How many candidates sampler plugin `name` wants, or why it cannot be asked.
    fn plugin_top_n(&self, name: &str) -> Result<usize, String> {
        match self.plugins.as_ref().and_then(|p| p.sampler(name)) {
            Some(slot) => slot.sampler_top_n().map(|n| n as usize).map_err(|e| e.to_string()),
            None => Err(format!("sampler plugin `{name}` is not loaded")),
        }
    }

    /// Builds the step's batch and launches it: pipelined when async scheduling is on, else run
    /// to the end (the results are then `ready`).
    fn launch(&mut self, output: SchedulerOutput, mut plan: Vec<PlannedSample>, feed: &HashMap<SeqId, usize>) -> InFlight {
        let pipelinable = self.async_scheduling && plan.iter().all(|p| self.pipelinable(p));
        let (sampled, ready) = match self.launch_batch(&output, &mut plan, feed) {
            // Launched and pending: taken by `complete`, now or after the next launch.
            Ok((sampled, None)) => (sampled, None),
            Ok((sampled, Some(results))) => (sampled, Some(Ok(results))),
            Err(error) => (Vec::new(), Some(Err(error))),
        };
        InFlight {
            pipelinable: pipelinable && ready.is_none(),
            sampled,
            ready,
            computed: false,
            placeholders: vec![false; plan.len()],
            forward_time: Default::default(),
            output,
            plan,
        }
    }

    /// Copies blocks, builds the batch and hands it to the backend with one `RowSampling` per
    /// planned sample whose sampler can run. Returns which plan entries have a row, and the
    /// results, or `None` when the backend launched the step to be collected later.
    #[allow(clippy::type_complexity)]
    fn launch_batch(
        &mut self,
        output: &SchedulerOutput,
        plan: &mut [PlannedSample],
        feed: &HashMap<SeqId, usize>,
    ) -> Result<(Vec<bool>, Option<Vec<SampledRow>>), ModelError> {
        if !output.copies.is_empty() {
            self.backend.copy_blocks(&output.copies);
        }
        let layout = *self.backend.kv_layout();
        let mut batch = ForwardBatch::new(layout.block_size, layout.num_blocks);
        for s in &output.scheduled {
            let seq = self.scheduler.get(s.id).expect("scheduled sequence");
            let end = s.start + s.num_new;
            batch.push_seq(&seq.tokens[s.start..end], s.start, seq.blocks.table(), s.samples).map_err(|e| ModelError::Input(e.to_string()))?;
            if seq.tokens[end - 1] == PLACEHOLDER_TOKEN {
                let sample = feed.get(&s.id).ok_or_else(|| ModelError::Input(format!("sequence {} has a placeholder token but no fed sample", s.id)))?;
                batch.feed_last_token(*sample);
            }
        }
        let (mut rows, sampled) = sampling_rows(&mut self.samples, plan, &mut []);
        if self.async_scheduling {
            self.backend.launch(&batch, &mut rows)?;
            Ok((sampled, None))
        } else {
            Ok((sampled, Some(self.backend.forward_sampled(&batch, &mut rows)?)))
        }
    }

    /// Emits a step's results; `placeholders` says which plan entries' sequences hold a
    /// placeholder for their token.
    fn process_samples(&mut self, plan: Vec<PlannedSample>, results: Vec<Option<SampledRow>>, placeholders: &[bool]) {
        let vocab = self.backend.config().vocab_size;
        // Sequences whose sampler is a plugin: their candidates, per plugin, sampled after the loop.
        let mut deferred: Vec<(String, Vec<PluginSampleInput>)> = Vec::new();
        for ((p, result), &placeholder) in plan.into_iter().zip(results).zip(placeholders) {
            if let Some((parent, state)) = p.fork {
                // The request may have failed earlier in this loop (a sibling's error).
                if self.scheduler.get(parent).is_none() || !self.requests.contains_key(&state.request) {
                    continue;
                }
                self.scheduler.fork(parent, p.seq, &mut self.kv);
                self.requests.get_mut(&state.request).expect("live request").samples.push(p.seq);
                self.samples.insert(p.seq, state);
            }
            let Some(sample) = self.samples.get(&p.seq) else { continue };
            match (p.plugin, result) {
                (Some(Err(error)), _) => self.fail_request(sample.request, error),
                (Some(Ok((name, _))), Some(SampledRow::Candidates { token_ids, logits })) => {
                    let input = self.plugin_input(p.seq, token_ids, logits);
                    match deferred.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, inputs)) => inputs.push(input),
                        None => deferred.push((name, vec![input])),
                    }
                }
                (None, Some(SampledRow::Token(sampled))) => self.emit_sampled(p.seq, sampled, placeholder),
                (_, other) => {
                    let message = format!("the backend returned {other:?} for sequence {}", p.seq);
                    self.fail_request(sample.request, EngineError::Forward(message));
                }
            }
        }
        for (name, inputs) in deferred {
            self.run_sampler_plugin(&name, inputs, vocab);
        }
    }

    /// What sampler plugin sees of sequence `seq_id`: its candidates (after the request's bias
    /// and penalties) and its recent past.
    fn plugin_input(&self, seq_id: SeqId, token_ids: Vec<u32>, logits: Vec<f32>) -> PluginSampleInput {
        let sample = &self.samples[&seq_id];
        let seq = self.scheduler.get(seq_id).expect("live sequence");
        let params = sample.sampler.params();
        PluginSampleInput {
            seq: seq_id,
            token_ids,
            logits,
            recent_tokens: seq.tokens[seq.tokens.len().saturating_sub(PLUGIN_RECENT_TOKENS)..].to_vec(),
            generated_tokens: seq.num_generated() as u32,
            temperature: Some(params.temperature),
            // The samples of a request draw apart, as the native sampler's do.
            seed: params.seed.map(|s| s.wrapping_add((sample.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))),
        }
    }

    /// One call of sampler plugin `name` for this step's sequences that chose it. On a fault,
    /// exactly the requests of those sequences fail.
    fn run_sampler_plugin(&mut self, name: &str, inputs: Vec<PluginSampleInput>, vocab: usize) {
        // A sequence may be gone already (a sibling sample failed its request this step).
        let inputs: Vec<PluginSampleInput> = inputs.into_iter().filter(|i| self.samples.contains_key(&i.seq)).collect();
        if inputs.is_empty() {
            return;
        }
        let result = match self.plugins.as_ref().and_then(|p| p.sampler(name)) {
            Some(slot) => slot.sample(&inputs, vocab).map_err(|e| e.to_string()),
            None => Err(format!("sampler plugin `{name}` is not loaded")),
        };
        match result {
            Ok(outputs) => {
                for (input, out) in inputs.iter().zip(outputs) {
                    let Some(sample) = self.samples.get_mut(&input.seq) else { continue };
                    sample.sampler.observe(out.token);
                    let sampled = Sampled { token: out.token, logprob: out.logprob.unwrap_or(f32::NAN), top: Vec::new() };
                    self.emit_sampled(input.seq, sampled, false);
                }
            }
            Err(message) => {
                let mut failed: Vec<RequestId> = inputs.iter().filter_map(|i| self.samples.get(&i.seq)).map(|s| s.request).collect();
                failed.sort_unstable();
                failed.dedup();
                for request in failed {
                    self.fail_request(request, EngineError::Plugin(message.clone()));
                }
            }
        }
    }

    /// Ends a request with an error event, counted as a failure (not also as a success), and
    /// frees its blocks first, so a client that sees the error sees them returned.
    fn fail_request(&mut self, id: RequestId, error: EngineError) {
        if let Some(state) = self.release(id) {
            self.metrics.request_failure.with_label_values(&[error.label()]).inc();
            let _ = state.events.send(StreamEvent::Error(error));
        }
    }

    /// Appends a sampled token (or writes it over the sequence's placeholder), streams it, and
    /// finishes the sample if it should stop.
    fn emit_sampled(&mut self, seq_id: SeqId, sampled: Sampled, placeholder: bool) {
        let vocab = self.backend.config().vocab_size;
        if sampled.token as usize >= vocab {
            // A sampler fault; the next step would read the token (on the device, a fed one
            // went in as 0): only this request fails.
            let request = self.samples[&seq_id].request;
            let message = format!("the sampler returned token {} outside the vocabulary of {vocab}", sampled.token);
            self.fail_request(request, EngineError::Forward(message));
            return;
        }
        let now = Instant::now();
        let sample = self.samples.get_mut(&seq_id).expect("live sample");
        let token = sampled.token;
        let seq = self.scheduler.get_mut(seq_id).expect("live sequence");
        match seq.tokens.last_mut().filter(|_| placeholder) {
            Some(last) => {
                debug_assert_eq!(*last, PLACEHOLDER_TOKEN);
                *last = token;
            }
            None => seq.tokens.push(token),
        }
        let generated = seq.num_generated();
        let total_len = seq.tokens.len();
        let request_id = sample.request;
        let state = self.requests.get_mut(&request_id).expect("live request");
        state.completion_tokens += 1;
        self.metrics.generation_tokens.inc();
        if state.first_token.is_none() {
            state.first_token = Some(now);
            self.metrics.prompt_tokens.inc_by(state.request.prompt_tokens.len() as u64);
            self.metrics.time_to_first_token.observe((now - state.arrival).as_secs_f64());
        }
        if let Some(last) = sample.last_token_at.replace(now) {
            self.metrics.time_per_output_token.observe((now - last).as_secs_f64());
        }
        let r = &state.request;
        // Under a constraint an end-of-sequence token is the grammar's end (it allowed it), so it
        // ends the output even with `ignore_eos`: otherwise a finished JSON object or choice would
        // decode masked EOS tokens up to `max_tokens`.
        let eos = (!r.ignore_eos || r.constraint.is_some()) && self.eos_tokens.contains(&token);
        let ends = TokenEnds {
            eos,
            stop_token: !eos && r.stop_token_ids.contains(&token),
            length: generated >= r.max_tokens || total_len >= self.max_model_len,
        };
        let TokenOutcome { delta, finish } = sample.text.take_token(&self.tokenizer, token, ends);
        let delta = match delta {
            Ok(d) => d,
            Err(error) => {
                let _ = state.events.send(StreamEvent::Error(EngineError::Detokenize(error.to_string())));
                self.abort(request_id);
                return;
            }
        };
        let index = sample.index;
        let logprobs = if r.sampling.logprobs.is_some() { vec![sampled] } else { Vec::new() };
        let _ = state.events.send(StreamEvent::Delta { index, token_ids: vec![token], text: delta.text, logprobs });
        if let Some((reason, stop_reason)) = finish {
            let _ = state.events.send(StreamEvent::Finished { index, reason, stop_reason });
            self.finish_sample(seq_id, reason);
        }
    }

    fn finish_sample(&mut self, seq_id: SeqId, reason: FinishReason) {
        let sample = self.samples.remove(&seq_id).expect("live sample");
        self.scheduler.remove(seq_id, &mut self.kv);
        let state = self.requests.get_mut(&sample.request).expect("live request");
        state.finished_samples += 1;
        if state.finished_samples < state.request.n {
            return;
        }
        let state = self.requests.remove(&sample.request).expect("live request");
        self.unpin_plugins(&state.request);
        let now = Instant::now();
        let usage = Usage { prompt_tokens: state.request.prompt_tokens.len(), completion_tokens: state.completion_tokens };
        let timings = RequestTimings {
            queue: state.first_scheduled.map_or_else(Default::default, |t| t - state.arrival),
            time_to_first_token: state.first_token.map_or_else(Default::default, |t| t - state.arrival),
            total: now - state.arrival,
        };
        self.metrics.e2e_request_latency.observe(timings.total.as_secs_f64());
        self.metrics.request_prompt_tokens.observe(usage.prompt_tokens as f64);
        self.metrics.request_generation_tokens.observe(usage.completion_tokens as f64);
        self.metrics.request_success.with_label_values(&[reason.as_str()]).inc();
        // Published before `Done`, so a client that saw its request end sees its blocks returned.
        self.metrics.kv_cache_usage_perc.set(self.kv.usage());
        let _ = state.events.send(StreamEvent::Done { usage, timings });
    }

    /// Sequences that wait while nothing runs can never be scheduled (validation should have
    /// refused them): fail them rather than spin.
    fn fail_unschedulable(&mut self) {
        if self.scheduler.num_running() > 0 || self.scheduler.is_empty() {
            return;
        }
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            if let Some(state) = self.requests.get(&id) {
                let _ = state.events.send(StreamEvent::Error(EngineError::TooLarge(format!(
                    "the request needs more KV-cache blocks than the {} the server has",
                    self.kv.num_blocks()
                ))));
            }
            self.abort(id);
        }
    }

    fn update_gauges(&mut self) {
        let running = self
            .requests
            .values()
            .filter(|r| r.samples.iter().any(|s| self.scheduler.get(*s).is_some_and(|seq| seq.running)))
            .count();
        self.metrics.num_requests_running.set(running as i64);
        self.metrics.num_requests_waiting.set((self.requests.len() - running) as i64);
        self.metrics.kv_cache_usage_perc.set(self.kv.usage());
        let stats = self.kv.prefix_cache_stats();
        self.metrics.prefix_cache_queries.inc_by(stats.queries - self.last_prefix_stats.queries);
        self.metrics.prefix_cache_hits.inc_by(stats.hits - self.last_prefix_stats.hits);
        self.last_prefix_stats = stats;
    }
}

/// One `RowSampling` per planned sample whose sampler can run, in plan order: live sequences'
/// samplers from `samples`, forks' from the plan; and, per plan entry, whether it has a row. A
/// sample that is gone (ended while its step ran) takes one of `spares`, so that the rows still
/// match the launch's.
fn sampling_rows<'a>(
    samples: &'a mut HashMap<SeqId, SampleState>,
    plan: &'a mut [PlannedSample],
    spares: &'a mut [SequenceSampler],
) -> (Vec<RowSampling<'a>>, Vec<bool>) {
    let mut spares = spares.iter_mut();
    let live_ids: HashSet<SeqId> = plan.iter().filter(|p| p.fork.is_none()).map(|p| p.seq).collect();
    let mut live: HashMap<SeqId, &mut SequenceSampler> =
        samples.iter_mut().filter(|(id, _)| live_ids.contains(id)).map(|(id, s)| (*id, &mut s.sampler)).collect();
    let mut rows = Vec::with_capacity(plan.len());
    let mut sampled = Vec::with_capacity(plan.len());
    for p in plan.iter_mut() {
        let candidates = match &p.plugin {
            None => None,
            Some(Ok((_, n))) => Some(*n),
            Some(Err(_)) => {
                sampled.push(false);
                continue;
            }
        };
        let sampler = match &mut p.fork {
            Some((_, state)) => &mut state.sampler,
            None => live.remove(&p.seq).or_else(|| spares.next()).expect("a live sample or a spare"),
        };
        rows.push(RowSampling { row: p.row, sampler, candidates });
        sampled.push(true);
    }
    (rows, sampled)
}
