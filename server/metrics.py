"""Prometheus metrics of one replica (a private registry, so tests and replicas never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Every metric the server exports at /metrics."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tmem_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.ttft = Histogram(
            "tmem_time_to_first_token_seconds", "time to first token", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.prompt_tokens = Counter("tmem_prompt_tokens_total", "prompt tokens", registry=r)
        self.completion_tokens = Counter("tmem_completion_tokens_total", "completion tokens", registry=r)
        self.update_lag = Histogram(
            "tmem_update_lag_seconds", "turn stored → new adapter version live", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.update_seconds = Histogram(
            "tmem_update_seconds", "worker time per update", ["stage"], registry=r, buckets=_LATENCY_BUCKETS
        )
        self.updates = Counter("tmem_updates_total", "updates by outcome", ["outcome"], registry=r)
        self.update_group_size = Histogram(
            "tmem_update_group_size", "sessions trained in one pass", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.batched_passes = Counter("tmem_batched_update_passes_total",
                                      "training passes that updated more than one session at once", registry=r)
        self.extraction_failures = Counter(
            "tmem_extraction_failures_total", "extraction outputs with no usable JSON array", registry=r
        )
        self.pairs_extracted = Counter("tmem_pairs_extracted_total", "QA pairs extracted and kept by the filter",
                                       registry=r)
        self.summaries_refused = Counter(
            "tmem_summaries_refused_total", "model-written summaries refused (empty, or echoing the prompt)",
            registry=r)
        self.train_loss = Gauge("tmem_training_loss", "final loss of the last applied update", registry=r)
        self.adapters_resident = Gauge("tmem_adapters_resident", "adapter versions loaded in the engine", registry=r)
        self.adapter_evictions = Counter(
            "tmem_adapter_evictions_total", "adapter versions unloaded, by reason (superseded, lru, deleted)",
            ["reason"], registry=r)
        self.hot_swap_seconds = Histogram(
            "tmem_hot_swap_seconds", "checkpoint → adapter loaded in the engine", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.queue_depth = Gauge("tmem_update_queue_depth", "update jobs waiting or in progress", registry=r)
        self.checkpoint_faults = Counter(
            "tmem_checkpoint_faults_total", "checkpoints refused on load (sha256 or format)", registry=r
        )
        self.store_errors = Counter(
            "tmem_store_unavailable_total", "requests refused because Redis was away", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()
