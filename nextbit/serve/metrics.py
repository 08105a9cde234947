"""The server's Prometheus metrics, in a registry of their own (so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nextbit_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("nextbit_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("nextbit_generation_tokens", "tokens generated", registry=r)
        self.running = Gauge("nextbit_requests_running", "requests decoding in the engine's slots", registry=r)
        self.waiting = Gauge("nextbit_requests_waiting", "requests queued for a slot", registry=r)
        self.ttft = Histogram("nextbit_time_to_first_token_seconds", "from arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nextbit_inter_token_latency_seconds", "between two tokens of one choice",
                             buckets=LATENCY_BUCKETS, registry=r)

    def load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def text(self) -> bytes:
        return generate_latest(self.registry)
