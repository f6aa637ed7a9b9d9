"""Prometheus metrics, named as operators know them from vLLM but prefixed `loraserve:`.

Each server owns its registry, so several servers (tests) can live in one process.
"""
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# Every counter and histogram would otherwise add a `_created` series, which Prometheus 2 stores as one more gauge.
disable_created_metrics()

MAX_ADAPTER_LABELS = 100  # per-adapter series beyond this would explode Prometheus' cardinality
ADAPTER_TIERS = ("disk", "cpu", "gpu")
# Waits that are short when the server keeps up: first tokens, queueing, prefill, adapter loads.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
# Whole requests and their decode phase: a long answer takes minutes.
REQUEST_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0)
STEP_TOKEN_BUCKETS = tuple(float(2**power) for power in range(15))  # 1 to 16384 tokens


class Metrics:
    """Every metric the server exports, and the text exposition of them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests_finished = Counter(
            "loraserve:request_success", "Requests finished, by finish reason (stop, length, abort, error).",
            ["finished_reason"], registry=registry)
        self.requests_rejected = Counter(
            "loraserve:request_rejected", "Requests refused before running, by reason.", ["reason"],
            registry=registry)
        self.prompt_tokens = Counter("loraserve:prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=registry)
        self.generation_tokens = Counter("loraserve:generation_tokens", "Tokens generated.", registry=registry)
        self.failed_steps = Counter(
            "loraserve:engine_failed_steps", "Engine steps that raised; their requests were retried in groups and "
            "only those failing alone were ended.", registry=registry)
        self.preemptions = Counter("loraserve:num_preemptions", "Requests preempted to free KV blocks.",
                                   registry=registry)
        self.time_to_first_token = Histogram(
            "loraserve:time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "loraserve:inter_token_latency_seconds", "Between two consecutive generated tokens of a request.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            "loraserve:request_time_per_output_token_seconds",
            "Per finished request of two tokens or more: from its first token to its last, over its tokens after "
            "the first.", buckets=TOKEN_LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            "loraserve:e2e_request_latency_seconds", "From arrival to the last token.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram(
            "loraserve:request_queue_time_seconds", "From arrival to the first scheduled step.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.prefill_time = Histogram(
            "loraserve:request_prefill_time_seconds", "From the first scheduled step to the first token.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_time = Histogram(
            "loraserve:request_decode_time_seconds", "From the first token to the last, per finished request.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self.step_tokens = Histogram(
            "loraserve:iteration_tokens_total", "Tokens computed per engine step, prompt and generated.",
            buckets=STEP_TOKEN_BUCKETS, registry=registry)
        self.running = Gauge("loraserve:num_requests_running", "Requests in the running batch.", registry=registry)
        self.waiting = Gauge("loraserve:num_requests_waiting", "Requests waiting to be scheduled.",
                             registry=registry)
        self.swapped = Gauge("loraserve:num_requests_swapped",
                             "Always 0: preemption recomputes, nothing is swapped to CPU (kept for dashboards).",
                             registry=registry)
        self.kv_cache_usage = Gauge("loraserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                    registry=registry)
        self.prefix_cache_queries = Counter(
            "loraserve:prefix_cache_queries", "Tokens of admitted requests looked up in the prefix cache.",
            registry=registry)
        self.prefix_cache_hits = Counter(
            "loraserve:prefix_cache_hits", "Tokens whose KV the prefix cache already held.", registry=registry)
        self.prefix_cache_blocks = Gauge(
            "loraserve:prefix_cache_blocks", "KV blocks the prefix cache holds, in use or free.", registry=registry)
        self.prefix_cache_evictions = Counter(
            "loraserve:prefix_cache_evictions", "Cached KV blocks evicted to be reused.", registry=registry)
        self.spec_drafts = Counter(
            "loraserve:spec_decode_num_drafts", "Draft runs verified (a request's drafts in one step).",
            registry=registry)
        self.spec_draft_tokens = Counter(
            "loraserve:spec_decode_num_draft_tokens", "Draft tokens verified.", registry=registry)
        self.spec_accepted_tokens = Counter(
            "loraserve:spec_decode_num_accepted_tokens", "Draft tokens the target model accepted.",
            registry=registry)
        self.spec_accepted_per_position = Counter(
            "loraserve:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft (0 is the first).", ["position"], registry=registry)
        self.spec_unverified_tokens = Counter(
            "loraserve:spec_decode_num_unverified_tokens",
            "Tokens proposed but not verified, as not expected to pay for their rows (--spec-adaptive).",
            registry=registry)

        self.adapter_loads = Counter("loraserve:adapter_loads", "Adapter loads, by tier loaded into (cpu, gpu).",
                                     ["tier"], registry=registry)
        self.adapter_evictions = Counter("loraserve:adapter_evictions", "Adapters evicted, by tier left (cpu, gpu).",
                                         ["tier"], registry=registry)
        self.adapter_load_latency = Histogram(
            "loraserve:adapter_load_latency_seconds", "Time to load an adapter into a tier.", ["tier"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.adapter_requests = Counter("loraserve:adapter_requests", "Requests admitted, by adapter (bounded).",
                                        ["adapter"], registry=registry)
        self.adapter_labels: set[str] = set()
        self.adapter_slots_in_use = Gauge("loraserve:adapter_slots_in_use", "Adapter slots holding some adapter.",
                                          registry=registry)
        self.adapter_slots_held = Gauge("loraserve:adapter_slots_held",
                                        "Adapter slots that running requests hold (warm slots nobody holds excluded).",
                                        registry=registry)
        self.waiting_for_adapter = Gauge("loraserve:num_requests_waiting_adapter",
                                         "Requests whose adapter is not in a slot yet (being loaded, or waiting for a "
                                         "slot to be released).", registry=registry)
        self.adapter_queue_time = Histogram(
            "loraserve:adapter_request_queue_time_seconds",
            "From arrival to the first scheduled step, by adapter (bounded; the base model is \"\").", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.adapters_loaded = Gauge("loraserve:adapters_loaded",
                                     "Current adapter versions, by the highest tier they sit in (disk, cpu, gpu).",
                                     ["tier"], registry=registry)
        # vLLM's shape, which Kubernetes inference routers read to send a request where its adapter is.
        self.lora_requests_info = Gauge(
            "loraserve:lora_requests_info", "Adapters of running and of waiting requests (comma-separated) and the "
            "most adapters held at once; the value is when this was read (unix time).",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=registry)

    def first_token(self, arrival: float, first_scheduled: float, now: float, adapter: str | None) -> None:
        """A request's first token ends its queueing and prefill phases (times from time.monotonic())."""
        self.time_to_first_token.observe(now - arrival)
        self.queue_time.observe(first_scheduled - arrival)
        self.adapter_queue_time.labels(adapter=self.adapter_label(adapter or "")).observe(first_scheduled - arrival)
        self.prefill_time.observe(now - first_scheduled)

    def request_done(self, arrival: float, first_token: float, last_token: float, num_output_tokens: int) -> None:
        """The whole-request latencies of a request that finished on its own (not aborted)."""
        self.e2e_latency.observe(last_token - arrival)
        self.decode_time.observe(last_token - first_token)
        if num_output_tokens > 1:
            self.time_per_output_token.observe((last_token - first_token) / (num_output_tokens - 1))

    def speculated(self, num_drafts: int, num_accepted: int) -> None:
        """One request's drafts verified in a step: `num_accepted` of `num_drafts` kept, always the leading ones."""
        self.spec_drafts.inc()
        self.spec_draft_tokens.inc(num_drafts)
        self.spec_accepted_tokens.inc(num_accepted)
        for position in range(num_accepted):
            self.spec_accepted_per_position.labels(position=str(position)).inc()

    def count_adapter_tiers(self, tiers: Iterable[str]) -> None:
        """Refresh `adapters_loaded` from the tier of every current adapter version (at scrape time)."""
        counts = dict.fromkeys(ADAPTER_TIERS, 0)
        for tier in tiers:
            counts[tier] = counts.get(tier, 0) + 1
        for tier, count in counts.items():
            self.adapters_loaded.labels(tier=tier).set(count)

    def adapter_activity(self, running: list[str], waiting: list[str], max_lora: int) -> None:
        """Refresh `lora_requests_info` (at scrape time): one sample, the current one."""
        self.lora_requests_info.clear()
        self.lora_requests_info.labels(",".join(running), ",".join(waiting), str(max_lora)).set(time.time())

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        """Called by the adapter registry (it knows nothing of Prometheus)."""
        self.adapter_loads.labels(tier=tier).inc()
        self.adapter_load_latency.labels(tier=tier).observe(seconds)

    def adapter_evicted(self, tier: str) -> None:
        self.adapter_evictions.labels(tier=tier).inc()

    def prefix_cache_queried(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Called by the block manager at each admission (it knows nothing of Prometheus)."""
        self.prefix_cache_queries.inc(num_tokens)
        self.prefix_cache_hits.inc(num_hit_tokens)

    def prefix_cache_evicted(self) -> None:
        self.prefix_cache_evictions.inc()

    def adapter_label(self, name: str) -> str:
        """The adapter's own label for the first MAX_ADAPTER_LABELS names seen, "other" for the rest."""
        if name not in self.adapter_labels and len(self.adapter_labels) >= MAX_ADAPTER_LABELS:
            return "other"
        self.adapter_labels.add(name)
        return name

    def count_adapter_request(self, name: str) -> None:
        self.adapter_requests.labels(adapter=self.adapter_label(name)).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
