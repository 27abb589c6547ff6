"""Prometheus metrics of one server: request outcomes, tokens, latencies, and the engine's gauges."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("grokstack_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("grokstack_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("grokstack_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("grokstack_time_to_first_token_seconds", "submit to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("grokstack_inter_token_latency_seconds", "time between tokens of one sequence",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.queue = Gauge("grokstack_queue_depth", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("grokstack_running_requests", "requests in the running batch", registry=r)
        self.batch = Gauge("grokstack_batch_size", "sequences in the running batch", registry=r)
        self.kv_used = Gauge("grokstack_kv_memory_bytes", "KV cache memory in blocks held by sequences", registry=r)
        self.kv_limit = Gauge("grokstack_kv_limit_bytes", "KV cache memory of the block pool (--kv-memory)",
                              registry=r)
        self.kv_blocks = Gauge("grokstack_kv_blocks", "KV cache blocks by state", ["state"], registry=r)
        self.preemptions = Gauge("grokstack_preemptions", "sequences preempted for KV blocks (recomputed later)",
                                 registry=r)
        self.cached = Gauge("grokstack_prefix_cache_tokens", "prompt tokens served from the prefix cache",
                            registry=r)
        self.deferred = Gauge("grokstack_deferred_jobs", "deferred completions stored", ["state"], registry=r)

    def render(self, engine, store) -> bytes:
        s = engine.stats()
        self.queue.set(s.waiting)
        self.running.set(s.running)
        self.batch.set(s.batch)
        self.kv_used.set(s.kv_bytes_used)
        self.kv_limit.set(s.kv_bytes_total)
        self.kv_blocks.labels("used").set(s.kv_blocks_used)
        self.kv_blocks.labels("total").set(s.kv_blocks_total)
        self.preemptions.set(s.preemptions)
        self.cached.set(s.cached_tokens)
        for state, n in store.counts().items():
            self.deferred.labels(state).set(n)
        return generate_latest(self.registry)
