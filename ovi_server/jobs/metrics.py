"""Prometheus metrics: queue depth and jobs by state (read from the store at scrape time), denoising step
and end-to-end seconds (observed by the worker). One registry per server, so tests can build many."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ovi_server.jobs.store import JobStatus, JobStore


class _StoreCollector(Collector):
    def __init__(self, store: JobStore):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts()
        depth = GaugeMetricFamily("ovi_queue_depth", "Requests waiting for the worker")
        depth.add_metric([], counts[JobStatus.QUEUED])
        yield depth
        jobs = GaugeMetricFamily("ovi_jobs", "Requests in the store by state", labels=["state"])
        for status, n in counts.items():
            jobs.add_metric([status.value], n)
        yield jobs


class Metrics:
    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.step_seconds = Histogram(
            "ovi_denoise_step_seconds",
            "Seconds per denoising step (both towers, all guidance passes)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "ovi_request_seconds",
            "Seconds from submit to finish, by outcome",
            labelnames=["outcome"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400, 3600),
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "ovi_inference_seconds",
            "Seconds the worker spent on one request (load of inputs to stored MP4)",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
