"""Prometheus metrics of the server, summed over its worker processes.

`python -m embedctl.serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh folder before the workers start, so each
worker writes its samples there and `/metrics` (answered by any worker) reads them all.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from embedctl.serve.batcher import BatchStats

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

REQUESTS = Counter("embedctl_requests", "HTTP requests answered", ["route", "status"])
ERRORS = Counter("embedctl_errors", "Requests answered with an error", ["route", "type"])
TOKENS = Counter("embedctl_tokens", "Tokens of the inputs embedded", ["route"])
CACHE = Counter("embedctl_cache_lookups", "Texts looked up in the embedding cache", ["result"])
LATENCY = Histogram("embedctl_request_seconds", "Time from request to response", ["route"], buckets=SECONDS)
QUEUE_WAIT = Histogram("embedctl_queue_wait_seconds", "Time a request waited for its batch", buckets=SECONDS)
BATCH_SEQUENCES = Histogram("embedctl_batch_sequences", "Sequences run in one model call", buckets=SIZES)
BATCH_REQUESTS = Histogram("embedctl_batch_requests", "Requests merged into one model call", buckets=SIZES)
BATCH_TOKENS = Histogram("embedctl_batch_tokens", "Tokens run in one model call",
                         buckets=tuple(64 * s for s in SIZES))
MODEL_SECONDS = Histogram("embedctl_model_seconds", "Time of one model call", buckets=SECONDS)


def batch(stats: BatchStats) -> None:
    BATCH_SEQUENCES.observe(stats.sequences)
    BATCH_REQUESTS.observe(stats.requests)
    BATCH_TOKENS.observe(stats.tokens)
    MODEL_SECONDS.observe(stats.seconds)
    for wait in stats.waits:
        QUEUE_WAIT.observe(wait)


def cache(hits: int, misses: int) -> None:
    if hits:
        CACHE.labels("hit").inc(hits)
    if misses:
        CACHE.labels("miss").inc(misses)


def exposition() -> bytes:
    """The text format of every worker's samples (this process's alone outside multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def process_ended(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


__all__ = ["CONTENT_TYPE", "batch", "cache", "exposition", "process_ended"]
