"""Every replica's metrics at the ingress's /metrics: each replica posts its Prometheus text to the board every
PUSH_INTERVAL_S seconds, and a scrape gets them all as one text, each sample labelled with its replica, so one
Prometheus target shows every replica (`lora_requests_info` included, per replica, for routers that read it).
A replica that stopped posting (it died) drops out after STALE_S seconds."""
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

PUSH_INTERVAL_S = 2.0
STALE_S = 10.0


def merged_exposition(texts: dict[str, str]) -> bytes:
    """The replicas' texts as one, every sample given a `replica` label."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value, sample.timestamp,
                                  sample.exemplar)

    class Collected:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry()
    registry.register(Collected())
    return generate_latest(registry)


@serve.deployment(name="MetricsBoard", ray_actor_options={"num_cpus": 0})
class MetricsBoard:
    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {replica: entry for replica, entry in self.texts.items() if now - entry[0] < STALE_S}
        return {replica: text for replica, (_, text) in self.texts.items()}
