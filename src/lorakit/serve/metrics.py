"""The server's Prometheus metrics, per adapter ("" for the base model), served at /metrics.

Per adapter: requests (by endpoint and status), prompt and generated tokens, errors, time to first token and
the time between tokens (histograms), loads and evictions, and the time a cold load takes. Of the server:
requests waiting, sequences running, adapters resident and their bytes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One server's metrics, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Requests by adapter, endpoint and HTTP status",
                                ["adapter", "endpoint", "status"], registry=r)
        self.errors = Counter("lorakit_request_errors", "Requests that ended in an error, by adapter and type",
                              ["adapter", "type"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens read", ["adapter"], registry=r)
        self.generated_tokens = Counter("lorakit_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "From the request's arrival to its first token",
                              ["adapter"], buckets=LATENCY, registry=r)
        self.itl = Histogram("lorakit_inter_token_latency_seconds", "Between two tokens of one stream",
                             ["adapter"], buckets=LATENCY, registry=r)
        self.loads = Counter("lorakit_adapter_loads", "Adapters made resident", ["adapter"], registry=r)
        self.load_seconds = Histogram("lorakit_adapter_load_seconds", "Reading, checking and placing a cold adapter",
                                      ["adapter"], buckets=LATENCY, registry=r)
        self.evictions = Counter("lorakit_adapter_evictions", "Adapters evicted to make room", ["adapter"], registry=r)
        self.waiting = Gauge("lorakit_queue_depth", "Requests waiting to start", registry=r)
        self.running = Gauge("lorakit_running_sequences", "Sequences in the running batch", registry=r)
        self.resident = Gauge("lorakit_resident_adapters", "Adapters on the model", registry=r)
        self.resident_bytes = Gauge("lorakit_resident_adapter_bytes", "Bytes of the adapters on the model", registry=r)

    def event(self, kind: str, adapter: str, seconds: float) -> None:
        """A registry event: an adapter loaded (and how long it took) or evicted."""
        if kind == "load":
            self.loads.labels(adapter).inc()
            self.load_seconds.labels(adapter).observe(seconds)
        else:
            self.evictions.labels(adapter).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
