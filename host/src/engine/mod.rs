//! The engine: its own thread running the step loop (schedule, run the model, sample, emit),
//! reached by the HTTP side through a cloneable `EngineHandle`. Commands go in over a channel that
//! never blocks the sender; each request's events come back over its own unbounded channel. The
//! engine thread never awaits, the HTTP side never blocks.
//!
//! Dropping a `RequestStream` before it ends aborts the request: its blocks are back in the pool
//! within one step.

mod core;
mod output;
mod request;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use self::core::{EngineCore, EngineSnapshot};
pub use self::output::{TextDelta, TextStream};
pub use self::request::{
    FinishReason, GenerateRequest, RequestId, RequestTimings, StopReason, StreamEvent, Usage,
};
use crate::metrics::Metrics;
use crate::plugin::PluginRegistry;
use crate::runner::ModelBackend;
use crate::sched::{Scheduler, SchedulerConfig, SchedulingPolicy};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    #[error("the engine is not running")]
    Unavailable,
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("detokenizing failed: {0}")]
    Detokenize(String),
    #[error("{0}")]
    TooLarge(String),
    /// A plugin the request depends on failed or is not loaded (the message names it).
    #[error("{0}")]
    Plugin(String),
    /// A constraint plugin refused the request's configuration (the message names it).
    #[error("{0}")]
    PluginRefused(String),
}

impl EngineError {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            EngineError::QueueFull(_) => "queue_full",
            EngineError::Unavailable => "unavailable",
            EngineError::Forward(_) => "forward",
            EngineError::Detokenize(_) => "detokenize",
            EngineError::TooLarge(_) => "too_large",
            EngineError::Plugin(_) => "plugin",
            EngineError::PluginRefused(_) => "plugin_refused",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub max_model_len: usize,
    /// Most requests waiting to start before new ones are refused.
    pub max_queue: usize,
    pub prefix_caching: bool,
    /// Pipeline steps where the backend can (`EngineCore`'s async scheduling).
    pub async_scheduling: bool,
}

enum Command {
    // Boxed: a request is far larger than the other commands.
    Add { id: RequestId, request: Box<GenerateRequest>, events: tokio::sync::mpsc::UnboundedSender<StreamEvent> },
    /// Ends a request early; the reason is what the metrics count (`abort` for a client gone).
    Abort(RequestId, FinishReason),
    SetPolicy(Box<dyn SchedulingPolicy>),
    SetPlugins(Arc<PluginRegistry>),
    Snapshot(tokio::sync::oneshot::Sender<EngineSnapshot>),
    Shutdown,
}

/// State the engine thread publishes for the HTTP side, without a round trip.
struct Shared {
    next_id: AtomicU64,
    /// Requests submitted whose first step has not come yet: still in the inbox, or waiting in
    /// the engine (see `run`).
    waiting: AtomicUsize,
    alive: AtomicBool,
    /// Why the engine's last forward pass failed, while no later one has succeeded.
    forward_failure: std::sync::Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    max_queue: usize,
}

/// The events of one request. Dropping it before `Done` aborts the request.
pub struct RequestStream {
    pub id: RequestId,
    events: UnboundedReceiver<StreamEvent>,
    handle: EngineHandle,
    ended: bool,
}

impl RequestStream {
    /// The next event; `None` once the request is over.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.ended {
            return None;
        }
        match self.events.recv().await {
            Some(event) => {
                if matches!(event, StreamEvent::Done { .. } | StreamEvent::Error(_)) {
                    self.ended = true;
                }
                Some(event)
            }
            None => {
                // The engine dropped the request without a last word: it went down.
                self.ended = true;
                Some(StreamEvent::Error(EngineError::Unavailable))
            }
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.handle.commands.send(Command::Abort(self.id, FinishReason::Abort));
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn(
        backend: Box<dyn ModelBackend>,
        tokenizer: Arc<Tokenizer>,
        metrics: Arc<Metrics>,
        policy: Box<dyn SchedulingPolicy>,
        config: EngineConfig,
    ) -> (EngineHandle, JoinHandle<()>) {
        let (commands, inbox) = mpsc::channel();
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            waiting: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            forward_failure: Default::default(),
        });
        let scheduler = Scheduler::new(config.scheduler, policy);
        let mut core = EngineCore::new(backend, tokenizer, metrics, scheduler, config.prefix_caching, config.max_model_len);
        core.set_async_scheduling(config.async_scheduling);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pagedserve-engine".into())
            .spawn(move || run(core, inbox, thread_shared))
            .expect("spawning the engine thread");
        (EngineHandle { commands, shared, max_queue: config.max_queue }, thread)
    }

    /// Most requests that may wait at once (`--max-queue`).
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Why the engine is not fit to serve, if it is not: its thread is gone, or its last forward
    /// pass failed (until one succeeds).
    pub fn unhealthy(&self) -> Option<String> {
        if !self.is_alive() {
            return Some("the engine is not running".into());
        }
        let failure = self.shared.forward_failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.as_ref().map(|e| format!("the engine's last forward pass failed: {e}"))
    }

    /// Queues a request. Refused when the waiting queue is full or the engine is down.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Unavailable);
        }
        let waiting = self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_queue {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull(self.max_queue));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = unbounded_channel();
        if self.commands.send(Command::Add { id, request: Box::new(request), events: events_tx }).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Unavailable);
        }
        Ok(RequestStream { id, events, handle: self.clone(), ended: false })
    }

    /// Replaces the scheduling policy between two steps.
    pub fn set_policy(&self, policy: Box<dyn SchedulingPolicy>) -> Result<(), EngineError> {
        self.commands.send(Command::SetPolicy(policy)).map_err(|_| EngineError::Unavailable)
    }

    /// Gives the engine the plugin registry (sampler plugins are looked up there).
    pub fn set_plugins(&self, plugins: Arc<PluginRegistry>) -> Result<(), EngineError> {
        self.commands.send(Command::SetPlugins(plugins)).map_err(|_| EngineError::Unavailable)
    }

    /// Ends request `id` early because the server decided so (an output filter's stop): counted
    /// as finished with `stop`, not as an abort. Its streams should be dropped after this.
    pub fn stop(&self, id: RequestId) {
        let _ = self.commands.send(Command::Abort(id, FinishReason::Stop));
    }

    /// The engine's state, taken between two steps (so it waits for the step running now).
    pub async fn snapshot(&self) -> Result<EngineSnapshot, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands.send(Command::Snapshot(reply)).map_err(|_| EngineError::Unavailable)?;
        answer.await.map_err(|_| EngineError::Unavailable)
    }

    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

impl crate::plugin::PluginHost for EngineHandle {
    fn swap_policy(&self, policy: Box<dyn SchedulingPolicy>) -> bool {
        self.set_policy(policy).is_ok()
    }

    fn use_registry(&self, registry: Arc<PluginRegistry>) -> bool {
        self.set_plugins(registry).is_ok()
    }
}

/// The engine thread's side of `Shared::waiting` (see `run`).
struct WaitingCount<'a> {
    shared: &'a Shared,
    /// The engine's own waiting requests when last published.
    engine_waiting: usize,
}

impl WaitingCount<'_> {
    /// Adds the change since the last call: `taken` submissions moved from the inbox into the
    /// engine (already counted), and the engine now has `now` waiting requests.
    fn publish(&mut self, now: usize, taken: usize) {
        // Wrapping add of a signed change: the counter itself never goes below zero.
        let change = now.wrapping_sub(self.engine_waiting).wrapping_sub(taken);
        self.shared.waiting.fetch_add(change, Ordering::AcqRel);
        self.engine_waiting = now;
    }
}

fn run(mut core: EngineCore, inbox: mpsc::Receiver<Command>, shared: Arc<Shared>) {
    // `shared.waiting` counts requests submitted but not yet taken from the inbox plus the
    // engine's waiting ones. The engine adds the change it caused rather than storing its own
    // count, which would forget the submissions still in the inbox and let `--max-queue` overflow.
    let mut count = WaitingCount { shared: &shared, engine_waiting: 0 };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
        let mut taken = 0usize;
        // Idle: sleep until a command comes. Busy: take what is there and step.
        let first = if core.has_work() {
            inbox.try_recv().ok()
        } else {
            match inbox.recv_timeout(Duration::from_secs(1)) {
                Ok(command) => Some(command),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        for command in first.into_iter().chain(std::iter::from_fn(|| inbox.try_recv().ok())) {
            match command {
                Command::Add { id, request, events } => {
                    taken += 1;
                    core.add_request(id, *request, events);
                }
                Command::Abort(id, reason) => core.end_early(id, reason),
                Command::SetPolicy(policy) => {
                    let old = core.set_policy(policy);
                    tracing::info!(old = old.name(), new = core.policy_name(), "scheduling policy replaced");
                }
                Command::SetPlugins(plugins) => core.set_plugins(plugins),
                Command::Snapshot(reply) => {
                    let _ = reply.send(core.snapshot());
                }
                Command::Shutdown => {
                    core.fail_all(EngineError::Unavailable);
                    return;
                }
            }
        }
        // Published once the batch is chosen, before the step's first output reaches a client.
        // Nothing later in a step makes a request wait or stop waiting, so a step that chose a
        // batch needs no second count; one that chose none (idle, or nothing fit) publishes here.
        let mut published = false;
        core.step_then(|core| {
            count.publish(core.num_waiting_requests(), taken);
            published = true;
        });
        if !published {
            count.publish(core.num_waiting_requests(), taken);
        }
        let failure = core.forward_failure().map(str::to_string);
        let mut shared_failure = shared.forward_failure.lock().unwrap_or_else(|e| e.into_inner());
        if *shared_failure != failure {
            *shared_failure = failure;
        }
    }));
    shared.alive.store(false, Ordering::Release);
    if result.is_err() {
        tracing::error!("the engine thread panicked; requests in flight fail with 503");
    }
}
