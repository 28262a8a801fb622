//! Prometheus metrics of the server (`GET /metrics`), through the `prometheus` crate.

use crate::engine::EngineStats;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Finished requests by outcome: stop, length, cancelled, error, rejected (bad request),
    /// busy (queue full).
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub prefix_cache_hit_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    running: IntGauge,
    waiting: IntGauge,
    kv_blocks_used: IntGauge,
    kv_blocks_free: IntGauge,
    kv_blocks_cached: IntGauge,
    preemptions: IntGauge,
    spec_drafted: IntCounter,
    spec_accepted: IntCounter,
    /// Rendering copies the engine's running totals into the counters: one render at a time.
    render_lock: std::sync::Mutex<()>,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name: &str, help: &str| register(&r, IntCounter::new(name, help).expect("valid metric"));
        let gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help).expect("valid metric"));
        let seconds = |name: &str, help: &str, buckets: Vec<f64>| {
            register(&r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric"))
        };
        let latency = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        Metrics {
            requests: register(
                &r,
                IntCounterVec::new(Opts::new("kiln_requests_total", "Requests by outcome"), &["outcome"])
                    .expect("valid metric"),
            ),
            prompt_tokens: counter("kiln_prompt_tokens_total", "Prompt tokens of finished requests"),
            generation_tokens: counter("kiln_generation_tokens_total", "Generated tokens"),
            prefix_cache_hit_tokens: counter(
                "kiln_prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache instead of computed",
            ),
            time_to_first_token: seconds(
                "kiln_time_to_first_token_seconds",
                "From a request's arrival to its first token",
                latency.clone(),
            ),
            inter_token_latency: seconds(
                "kiln_inter_token_latency_seconds",
                "Between consecutive tokens of one choice",
                latency,
            ),
            running: gauge("kiln_running_sequences", "Sequences in the running batch"),
            waiting: gauge("kiln_waiting_sequences", "Sequences waiting to start"),
            kv_blocks_used: gauge("kiln_kv_blocks_used", "KV cache blocks referenced by a sequence"),
            kv_blocks_free: gauge("kiln_kv_blocks_free", "KV cache blocks free (cached prefixes included)"),
            kv_blocks_cached: gauge("kiln_kv_blocks_cached", "KV cache blocks holding a reusable prefix block"),
            preemptions: gauge("kiln_preemptions", "Sequences preempted for KV cache room so far"),
            spec_drafted: counter(
                "kiln_spec_draft_tokens_total",
                "Tokens drafted by prompt lookup (speculative decoding, --lookup)",
            ),
            spec_accepted: counter(
                "kiln_spec_accepted_tokens_total",
                "Drafted tokens the model confirmed; acceptance = accepted / drafted",
            ),
            render_lock: std::sync::Mutex::new(()),
            registry: r,
        }
    }

    /// The text exposition, with the engine's gauges as of now.
    pub fn render(&self, stats: Option<&EngineStats>) -> String {
        let _one_at_a_time = self.render_lock.lock();
        if let Some(s) = stats {
            // The engine keeps running totals; counters only go up by the difference.
            self.spec_drafted.inc_by(s.drafted_tokens.saturating_sub(self.spec_drafted.get()));
            self.spec_accepted.inc_by(s.accepted_tokens.saturating_sub(self.spec_accepted.get()));
            self.running.set(s.running as i64);
            self.waiting.set(s.waiting as i64);
            self.kv_blocks_used.set(s.blocks_used as i64);
            self.kv_blocks_free.set((s.blocks_total - s.blocks_used) as i64);
            self.kv_blocks_cached.set(s.blocks_cached as i64);
            self.preemptions.set(s.preemptions as i64);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
