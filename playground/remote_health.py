"""Reachability, latency and queue of the servers behind remote variants.

Each remote variant's server is asked for its model list (timed: the round trip a request pays
before any token) and, where it exposes one, for its Prometheus `/metrics` at the server's
root, from which the requests running and waiting are read by the metric names each serving
engine uses. The text is parsed by prometheus_client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from playground.config import EndpointSpec

# (running, waiting) gauges by serving engine, as each names them in its /metrics.
QUEUE_METRICS: dict[str, tuple[str, str]] = {
    "vLLM": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "SGLang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
    "llama.cpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
    "TGI": ("tgi_batch_current_size", "tgi_queue_size"),
}


@dataclass(frozen=True)
class RemoteHealth:
    base_url: str
    reachable: bool
    latency_ms: float | None  # the model list's round trip
    error: str | None  # why it is unreachable
    running: float | None  # requests the server is working on, where its /metrics says
    waiting: float | None  # requests queued behind them
    queue_source: str  # which engine's metrics gave the queue, or why there is none
    checked_at: float


def metrics_url(base_url: str) -> str:
    """The server's /metrics: at its root, beside the OpenAI API's /v1."""
    root = base_url.rstrip("/")
    root = root.removesuffix("/v1")
    return root + "/metrics"


def queue_from_metrics(text: str) -> tuple[float | None, float | None, str]:
    """(running, waiting, engine) from Prometheus exposition text; gauges summed over their
    labels (one per model or rank)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    for engine, (running, waiting) in QUEUE_METRICS.items():
        if running in totals or waiting in totals:
            return totals.get(running), totals.get(waiting), f"{engine} /metrics"
    return None, None, "its /metrics names no known queue gauge"


def check(endpoint: EndpointSpec, timeout_s: float = 2.0) -> RemoteHealth:
    """One look at the server behind `endpoint`; never raises."""
    headers = endpoint.auth_headers()
    base = endpoint.base_url.rstrip("/")
    started = time.perf_counter()
    try:
        reply = httpx.get(f"{base}/models", headers=headers, timeout=timeout_s)
        latency_ms = (time.perf_counter() - started) * 1000
        reply.raise_for_status()
    except httpx.HTTPStatusError as err:
        return RemoteHealth(
            base, False, None, f"it answered {err.response.status_code}", None, None, "unreachable", time.time()
        )
    except httpx.HTTPError as err:
        return RemoteHealth(base, False, None, err.__class__.__name__, None, None, "unreachable", time.time())
    try:
        metrics = httpx.get(metrics_url(base), headers=headers, timeout=timeout_s)
        if metrics.status_code != 200:
            raise ValueError(f"/metrics answered {metrics.status_code}")
        running, waiting, source = queue_from_metrics(metrics.text)
    except (httpx.HTTPError, ValueError) as err:
        running, waiting, source = None, None, f"no queue figures ({err})"
    return RemoteHealth(base, True, latency_ms, None, running, waiting, source, time.time())
