"""Prometheus metrics: request counts, per-stage latency histograms, batch sizes, model and index versions.

Each app gets its own registry, so several apps (tests, reloads) never collide on metric names.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

STAGES = ("decode", "encode_queue", "encode", "search_queue", "search", "generate_queue", "generate",
          "rescore_queue", "rescore", "total")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60, 100)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # memory, CPU, fds, GC, Python
            r.register(standard)
        self.requests = Counter("transresnet_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.in_flight = Gauge("transresnet_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.errors = Counter("transresnet_request_errors", "Refused requests by error code", ["error"], registry=r)
        self.stage_seconds = Histogram("transresnet_stage_seconds", "Latency of each stage of a caption request",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("transresnet_batch_size", "Requests per micro-batch", ["stage"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.decode_steps = Histogram("transresnet_generate_decode_steps", "Beam-search steps of the decode that "
                                      "answered a generate or hybrid request", buckets=STEP_BUCKETS, registry=r)
        self.generator_info = Gauge("transresnet_generator_info", "The caption generator being served (value 1)",
                                    ["name", "family", "version"], registry=r)
        self.personalities = Counter("transresnet_personalities_ranked", "Ranked lists returned", registry=r)
        self.reloads = Counter("transresnet_reloads", "Reloads (admin or index follow) by outcome", ["outcome"],
                               registry=r)
        self.index_follow = Counter("transresnet_index_follow", "Index-follow actions: reloaded, refused (a bad "
                                    "version, counted once), pointer_unreadable", ["outcome"], registry=r)
        self.index_info = Gauge("transresnet_index_info", "The index being served (value 1)",
                                ["version", "fingerprint"], registry=r)
        self.index_size = Gauge("transresnet_index_captions", "Captions in the index being served", registry=r)
        self.index_fallback = Gauge("transresnet_index_fallback", "1 when CURRENT named a version that failed "
                                    "verification and an older verified one is served", registry=r)
        self.index_fallback_info = Gauge("transresnet_index_fallback_info", "The version CURRENT names and the one "
                                         "served instead (value 1, during a fallback)", ["wanted", "serving"],
                                         registry=r)
        self.model_info = Gauge("transresnet_model_info", "The checkpoint being served (value 1)",
                                ["name", "version", "fingerprint"], registry=r)
        self.index_placement = Gauge("transresnet_index_placement_info", "Where the served index is searched "
                                     "(value 1): cpu, gpu, sharded or replicated", ["kind"], registry=r)
        self.index_gpus = Gauge("transresnet_index_gpus", "GPUs holding the served index (0: on CPU)", registry=r)
        self.search_max_batch = Gauge("transresnet_search_max_batch", "Most requests per search call (set by "
                                      "the index placement)", registry=r)
        self.loaded_at = Gauge("transresnet_loaded_timestamp_seconds", "When the served model/index were loaded",
                               registry=r)
        for stage in STAGES:  # export every series from the start, so dashboards see zeros, not gaps
            self.stage_seconds.labels(stage)
        for stage in ("encode", "search", "generate", "rescore"):
            self.batch_size.labels(stage)
        for outcome in ("reloaded", "refused", "pointer_unreadable"):
            self.index_follow.labels(outcome)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(value)

    def observe_batch(self, stage: str, size: int) -> None:
        self.batch_size.labels(stage).observe(size)

    def observe_decode_steps(self, steps: int) -> None:
        self.decode_steps.observe(steps)

    def set_generator(self, info: dict[str, Any]) -> None:
        self.generator_info.clear()
        self.generator_info.labels(info["name"], info["family"], info["version"]).set(1)

    def set_serving(self, model: dict[str, Any], index: dict[str, Any]) -> None:
        self.model_info.clear()
        self.model_info.labels(model["name"], model["version"], model["fingerprint"]).set(1)
        self.index_info.clear()
        self.index_info.labels(index["version"], model["fingerprint"]).set(1)
        self.index_size.set(index["size"])
        self.loaded_at.set(time.time())

    def set_index_fallback(self, fallback: dict[str, Any] | None) -> None:
        """Export whether the served index is a fallback from a bad CURRENT (and which versions)."""
        self.index_fallback_info.clear()
        self.index_fallback.set(0 if fallback is None else 1)
        if fallback is not None:
            self.index_fallback_info.labels(str(fallback["wanted"]), fallback["serving"]).set(1)

    def set_placement(self, placement: dict[str, Any], search_batch: int) -> None:
        """Export where the served index is searched and the search batch size that follows from it."""
        self.index_placement.clear()
        self.index_placement.labels(placement["kind"]).set(1)
        self.index_gpus.set(placement["gpus"])
        self.search_max_batch.set(search_batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)
