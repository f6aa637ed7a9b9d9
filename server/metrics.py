"""Prometheus metrics, named as operators know them from vLLM but prefixed `loraserve:`.

Each server owns its registry, so several servers (tests) can live in one process.
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0)


class Metrics:
    """Every metric the server exports, and the text exposition of them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests_finished = Counter(
            "loraserve:request_success", "Requests finished, by finish reason (stop, length, abort).",
            ["finished_reason"], registry=registry)
        self.requests_rejected = Counter(
            "loraserve:request_rejected", "Requests refused before running, by reason.", ["reason"],
            registry=registry)
        self.prompt_tokens = Counter("loraserve:prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=registry)
        self.generation_tokens = Counter("loraserve:generation_tokens", "Tokens generated.", registry=registry)
        self.preemptions = Counter("loraserve:num_preemptions", "Requests preempted to free KV blocks.",
                                   registry=registry)
        self.time_to_first_token = Histogram(
            "loraserve:time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "loraserve:inter_token_latency_seconds", "Between two consecutive generated tokens of a request.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            "loraserve:e2e_request_latency_seconds", "From arrival to the last token.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram(
            "loraserve:request_queue_time_seconds", "From arrival to the first scheduled step.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.running = Gauge("loraserve:num_requests_running", "Requests in the running batch.", registry=registry)
        self.waiting = Gauge("loraserve:num_requests_waiting", "Requests waiting to be scheduled.",
                             registry=registry)
        self.kv_cache_usage = Gauge("loraserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                    registry=registry)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
