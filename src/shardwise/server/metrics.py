"""Prometheus metrics for ``/metrics``: what an operator needs to see load, latency and failures.

Each app gets its own registry (not prometheus_client's global one), so several apps in one process,
as in the tests, count separately and never collide on registration.

| name | type | labels |
|---|---|---|
| shardwise_requests_total | counter | endpoint, status |
| shardwise_requests_cancelled_total | counter | (clients that went away mid-request) |
| shardwise_requests_running | gauge | (requests submitted to the engine, not finished) |
| shardwise_prompt_tokens_total | counter | |
| shardwise_generation_tokens_total | counter | |
| shardwise_time_to_first_token_seconds | histogram | (submit to first token) |
| shardwise_inter_token_latency_seconds | histogram | (between consecutive tokens of a request) |
| shardwise_request_latency_seconds | histogram | endpoint (whole HTTP exchange, streaming included) |
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Paths counted under their own name; anything else (typos, scanners) is "other", so labels stay few.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def endpoint_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ENDPOINTS else "other"


class Metrics:
    """The server's counters and histograms, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shardwise_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("shardwise_requests_cancelled", "Requests cancelled because the client went away",
                                 registry=r)
        self.running = Gauge("shardwise_requests_running", "Requests in the engine, not yet finished", registry=r)
        self.prompt_tokens = Counter("shardwise_prompt_tokens", "Prompt tokens of submitted requests", registry=r)
        self.generation_tokens = Counter("shardwise_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("shardwise_time_to_first_token_seconds", "Seconds from submit to the first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("shardwise_inter_token_latency_seconds", "Seconds between consecutive tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.latency = Histogram("shardwise_request_latency_seconds", "Seconds from request to the response's end",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = endpoint_label(path)
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
