"""Prometheus metrics, in a registry of their own per app (so several apps, e.g. in tests, never collide).

Requests are counted by route template and status; the engines report tokens, batch sizes, step
times, time to first token and how generations finished; queue depth and running sequences are read
from the engines when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quillgpt.serve.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """All of the server's metrics; also the engines' `EngineObserver`."""

    def __init__(self, engines: Callable[[], Mapping[str, Engine]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "quill_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "quill_request_duration_seconds",
            "Time from request to the end of its response (streams: last byte).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("quill_tokens_generated", "Tokens generated.", ["model"], registry=r)
        self.generations = Counter(
            "quill_generations",
            "Sequences finished, by reason (stop, length, cancelled, timeout).",
            ["model", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "quill_batch_size", "Sequences in each decode step.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "quill_decode_step_seconds",
            "Time of one decode step (all sequences of the batch).",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.ttft = Histogram(
            "quill_time_to_first_token_seconds",
            "Time from submission to a request's first token (queueing included).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engines))

    # EngineObserver
    def step(self, model: str, batch_size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(batch_size)
        self.step_seconds.labels(model).observe(seconds)
        self.tokens.labels(model).inc(batch_size)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def finished(self, model: str, reason: str, tokens: int) -> None:
        self.generations.labels(model, reason).inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges read from the engines at scrape time."""

    def __init__(self, engines: Callable[[], Mapping[str, Engine]]):
        self.engines = engines

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("quill_queue_depth", "Sequences waiting for a batch slot.", labels=["model"])
        active = GaugeMetricFamily("quill_active_sequences", "Sequences in the running batch.", labels=["model"])
        up = GaugeMetricFamily("quill_engine_up", "1 while the model's engine thread runs.", labels=["model"])
        for name, engine in self.engines().items():
            depth.add_metric([name], engine.queue_depth)
            active.add_metric([name], engine.active)
            up.add_metric([name], 1.0 if engine.alive else 0.0)
        yield from (depth, active, up)
