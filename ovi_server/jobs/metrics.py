"""Prometheus metrics, read from the store at scrape time: queue depth, jobs by state, and per-worker series
from the workers' heartbeats (their counters), so one scrape of any API process covers every worker on
every host. One registry per app, so tests can build many."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ovi_server.jobs.store import JobStatus, JobStore, WorkerState

# heartbeat counter → (metric name, help); the counters are cumulative since the worker process started
WORKER_COUNTERS = {
    "denoise_steps": ("ovi_worker_denoise_steps", "Denoising steps run"),
    "denoise_seconds": ("ovi_worker_denoise_seconds", "Seconds spent in denoising steps"),
    "inference_seconds": ("ovi_worker_inference_seconds", "Seconds from a job's start to its stored outcome"),
}


class _StoreCollector(Collector):
    def __init__(self, store: JobStore):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        counts = self.store.counts()
        depth = GaugeMetricFamily("ovi_queue_depth", "Requests waiting for a worker")
        depth.add_metric([], counts[JobStatus.QUEUED])
        yield depth
        jobs = GaugeMetricFamily("ovi_jobs", "Requests in the store by state", labels=["state"])
        for status, n in counts.items():
            jobs.add_metric([status.value], n)
        yield jobs

        workers = self.store.workers()
        labels = ["worker", "host", "device"]
        up = GaugeMetricFamily(
            "ovi_worker_busy", "1 while the worker runs a job, 0 when idle or loading", labels=labels
        )
        state = GaugeMetricFamily("ovi_workers", "Workers heard from recently, by state", labels=["state"])
        age = GaugeMetricFamily(
            "ovi_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat", labels=labels
        )
        done = CounterMetricFamily(
            "ovi_worker_jobs", "Jobs finished by the worker, by outcome", labels=[*labels, "outcome"]
        )
        counters = {
            k: CounterMetricFamily(name, text, labels=labels) for k, (name, text) in WORKER_COUNTERS.items()
        }
        now = time.time()
        for s in WorkerState:
            state.add_metric([s.value], sum(w.state is s for w in workers))
        for w in workers:
            key = [w.id, w.host, w.device]
            up.add_metric(key, 1.0 if w.state is WorkerState.BUSY else 0.0)
            age.add_metric(key, max(0.0, now - w.last_heartbeat))
            for name, value in sorted(w.stats.items()):
                if name.startswith("jobs_"):
                    done.add_metric([*key, name.removeprefix("jobs_")], value)
                elif name in counters:
                    counters[name].add_metric(key, value)
        yield from (state, up, age, done, *counters.values())


class Metrics:
    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)
