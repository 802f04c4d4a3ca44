//! Every Prometheus metric pagedserve exports, in one place. Names carry the `pagedserve_` prefix
//! and otherwise mirror vLLM's (`vllm:num_requests_running` -> `pagedserve_num_requests_running`)
//! so existing dashboards port by renaming the prefix. Every series is labelled with the model name.

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// What `Metrics::histogram_snapshot` reads off a histogram (JSON: `+Inf` is written as null).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistogramSnapshot {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

pub struct Metrics {
    registry: Registry,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    pub kv_cache_usage_perc: Gauge,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub num_preemptions: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub request_success: IntCounterVec,
    pub request_failure: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub iteration_tokens: Histogram,
    /// Wall time of each phase of an engine step: `schedule` (policy and KV blocks), `forward`
    /// (the model and sampling on the backend), `process` (tokens to events: stop checks,
    /// detokenizing, sampler plugins). What is not `forward` is the host's overhead.
    pub engine_step_phase: HistogramVec,
    pub scheduler_policy_faults: IntCounterVec,
    /// Plugin calls by kind and name (each engine step's scheduler call, sampler batch, filter call).
    pub plugin_calls: IntCounterVec,
    pub plugin_call_duration: HistogramVec,
    /// Plugin faults by kind, name and reason (`trap`, `deadline`, `limit`, `invalid_output`).
    pub plugin_faults: IntCounterVec,
    /// Changes of a plugin's active version (install, activate, rollback, remove) or of the
    /// scheduler plugin in use.
    pub plugin_swaps: IntCounterVec,
    /// Rollbacks, by the admin or the circuit breaker.
    pub plugin_rollbacks: IntCounterVec,
    /// 1 for the active version of each plugin: kind, name, version, sha256.
    pub plugin_active_info: IntGaugeVec,
    /// 1, labelled with the KV cache's configuration (vLLM's `cache_config_info`): block size,
    /// blocks, and what a value is stored as.
    pub cache_config_info: IntGaugeVec,
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        let registry = Registry::new_custom(
            Some("pagedserve".to_string()),
            Some([("model_name".to_string(), model_name.to_string())].into()),
        )
        .expect("valid registry");
        let latency_buckets = vec![
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        ];
        let token_buckets = exponential_buckets(1.0, 2.0, 16).expect("valid buckets");

        macro_rules! register {
            ($metric:expr) => {{
                let metric = $metric;
                registry.register(Box::new(metric.clone())).expect("metric registered once");
                metric
            }};
        }
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid gauge");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid histogram")
        };
        Metrics {
            num_requests_running: register!(gauge("num_requests_running", "Requests in the running batch.")),
            num_requests_waiting: register!(gauge("num_requests_waiting", "Requests waiting to be scheduled.")),
            kv_cache_usage_perc: register!(Gauge::new("kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1).")
                .expect("valid gauge")),
            prefix_cache_queries: register!(counter(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache."
            )),
            prefix_cache_hits: register!(counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")),
            num_preemptions: register!(counter("num_preemptions_total", "Sequences preempted (recompute).")),
            prompt_tokens: register!(counter("prompt_tokens_total", "Prompt tokens of the requests that produced a first token, counted then (prefix-cache hits included).")),
            generation_tokens: register!(counter("generation_tokens_total", "Tokens generated.")),
            request_success: register!(IntCounterVec::new(
                Opts::new("request_success_total", "Requests finished, by finish reason."),
                &["finished_reason"]
            )
            .expect("valid counter")),
            request_failure: register!(IntCounterVec::new(
                Opts::new("request_failure_total", "Requests that failed, by error label."),
                &["reason"]
            )
            .expect("valid counter")),
            time_to_first_token: register!(histogram(
                "time_to_first_token_seconds",
                "Time from arrival to the first generated token.",
                &latency_buckets
            )),
            time_per_output_token: register!(histogram(
                "time_per_output_token_seconds",
                "Time between consecutive generated tokens of a sequence.",
                &latency_buckets
            )),
            e2e_request_latency: register!(histogram(
                "e2e_request_latency_seconds",
                "Time from arrival to the last token.",
                &latency_buckets
            )),
            request_queue_time: register!(histogram(
                "request_queue_time_seconds",
                "Time from arrival to first being scheduled.",
                &latency_buckets
            )),
            request_prompt_tokens: register!(histogram(
                "request_prompt_tokens",
                "Prompt length of finished requests.",
                &token_buckets
            )),
            request_generation_tokens: register!(histogram(
                "request_generation_tokens",
                "Generated tokens of finished requests (all samples).",
                &token_buckets
            )),
            iteration_tokens: register!(histogram("iteration_tokens_total", "Tokens computed per engine step.", &token_buckets)),
            engine_step_phase: register!(HistogramVec::new(
                HistogramOpts::new("engine_step_phase_seconds", "Wall time of each phase of an engine step.")
                    .buckets(exponential_buckets(1e-5, 2.0, 20).expect("valid buckets")),
                &["phase"]
            )
            .expect("valid histogram")),
            scheduler_policy_faults: register!(IntCounterVec::new(
                Opts::new("scheduler_policy_faults_total", "Scheduling-policy answers rejected, by policy and reason."),
                &["policy", "reason"]
            )
            .expect("valid counter")),
            plugin_calls: register!(IntCounterVec::new(
                Opts::new("plugin_calls_total", "Plugin calls, by kind and name."),
                &["kind", "name"]
            )
            .expect("valid counter")),
            plugin_call_duration: register!(HistogramVec::new(
                HistogramOpts::new("plugin_call_duration_seconds", "Wall time of plugin calls, by kind and name.")
                    .buckets(exponential_buckets(1e-6, 2.5, 16).expect("valid buckets")),
                &["kind", "name"]
            )
            .expect("valid histogram")),
            plugin_faults: register!(IntCounterVec::new(
                Opts::new("plugin_faults_total", "Plugin faults, by kind, name and reason."),
                &["kind", "name", "reason"]
            )
            .expect("valid counter")),
            plugin_swaps: register!(IntCounterVec::new(
                Opts::new("plugin_swaps_total", "Plugin version changes and scheduler swaps, by kind and name."),
                &["kind", "name"]
            )
            .expect("valid counter")),
            plugin_rollbacks: register!(IntCounterVec::new(
                Opts::new("plugin_rollbacks_total", "Plugin rollbacks (admin or circuit breaker), by kind and name."),
                &["kind", "name"]
            )
            .expect("valid counter")),
            plugin_active_info: register!(IntGaugeVec::new(
                Opts::new("plugin_active_info", "The active version of each plugin (value 1)."),
                &["kind", "name", "version", "sha256"]
            )
            .expect("valid gauge")),
            cache_config_info: register!(IntGaugeVec::new(
                Opts::new("cache_config_info", "The KV cache's configuration (value 1)."),
                &["block_size", "num_gpu_blocks", "cache_dtype"]
            )
            .expect("valid gauge")),
            registry,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A histogram's buckets (upper bounds and cumulative counts, `+Inf` last), count and sum.
    pub fn histogram_snapshot(histogram: &Histogram) -> HistogramSnapshot {
        use prometheus::core::Metric as _;
        let metric = histogram.metric();
        let h = metric.get_histogram();
        let mut bounds: Vec<f64> = h.get_bucket().iter().map(|b| b.upper_bound()).collect();
        let mut cumulative: Vec<u64> = h.get_bucket().iter().map(|b| b.cumulative_count()).collect();
        bounds.push(f64::INFINITY);
        cumulative.push(h.get_sample_count());
        HistogramSnapshot { bounds, cumulative, count: h.get_sample_count(), sum: h.get_sample_sum() }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding never fails");
        String::from_utf8(out).expect("Prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_labelled_series() {
        let metrics = Metrics::new("tiny");
        metrics.prompt_tokens.inc_by(5);
        metrics.request_success.with_label_values(&["stop"]).inc();
        metrics.time_to_first_token.observe(0.03);
        let text = metrics.render();
        assert!(text.contains("pagedserve_prompt_tokens_total{model_name=\"tiny\"} 5"), "{text}");
        assert!(text.contains("pagedserve_request_success_total{finished_reason=\"stop\",model_name=\"tiny\"} 1"));
        assert!(text.contains("pagedserve_time_to_first_token_seconds_bucket"));
    }
}
