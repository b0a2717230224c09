"""``/metrics``: a scheduler snapshot in Prometheus' text format, with ``prometheus_client``.

``prometheus_client`` comes with ``pip install 'zfabric[dashboard]'``; without it the route
answers 501 with that command (:data:`INSTALL_HINT`). A private registry per render holds one
collector that reads the snapshot: nothing global, nothing kept between scrapes.
"""

from __future__ import annotations

INSTALL_HINT = ("/metrics needs the prometheus_client library: pip install 'zfabric[dashboard]'"
                " (or pip install prometheus_client)\n")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def families(snap: dict):
    """The metric families of one snapshot (imports prometheus_client)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    tasks = GaugeMetricFamily("zfabric_tasks", "Tasks the scheduler holds, by state and group",
                              labels=["state", "group"])
    for g in snap.get("groups", ()):
        for state in ("waiting", "processing", "memory", "released", "erred"):
            tasks.add_metric([state, g["name"]], g[state])
    yield tasks
    done = CounterMetricFamily("zfabric_tasks_forgotten",
                               "Tasks forgotten after finishing, by group", labels=["group"])
    for g in snap.get("groups", ()):
        done.add_metric([g["name"]], g["forgotten"])
    yield done
    workers = snap.get("workers", ())
    yield GaugeMetricFamily("zfabric_workers", "Connected workers", value=len(workers))
    yield GaugeMetricFamily("zfabric_threads", "Task threads of the connected workers",
                            value=sum(w["nthreads"] for w in workers))
    per_worker = [
        ("zfabric_worker_memory_bytes", "Resident memory of each worker process", "memory"),
        ("zfabric_worker_memory_limit_bytes", "Memory limit of each worker (0: none)",
         "memory_limit"),
        ("zfabric_worker_held_bytes", "Bytes of the values each worker holds", "nbytes"),
        ("zfabric_worker_held_tasks", "Values each worker holds", "held"),
        ("zfabric_worker_processing_tasks", "Tasks sent to each worker, not finished",
         "processing"),
        ("zfabric_worker_cpu_percent", "CPU use of each worker process", "cpu"),
    ]
    for name, doc, field in per_worker:
        fam = GaugeMetricFamily(name, doc, labels=["worker"])
        for w in workers:
            fam.add_metric([w["address"]], w[field])
        yield fam
    bounds = snap.get("buckets") or []
    hist = HistogramMetricFamily("zfabric_task_duration_seconds",
                                 "Compute time of finished tasks, by group", labels=["group"])
    for group, d in (snap.get("durations") or {}).items():
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, bounds), "+Inf"], d["buckets"], strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        hist.add_metric([group], buckets, d["sum"])
    yield hist
    c = snap.get("counters") or {}
    msgs = CounterMetricFamily("zfabric_messages", "Messages through the scheduler's socket",
                               labels=["direction"])
    msgs.add_metric(["in"], c.get("messages_in", 0))
    msgs.add_metric(["out"], c.get("messages_out", 0))
    yield msgs
    nbytes = CounterMetricFamily("zfabric_message_bytes",
                                 "Bytes through the scheduler's socket", labels=["direction"])
    nbytes.add_metric(["in"], c.get("bytes_in", 0))
    nbytes.add_metric(["out"], c.get("bytes_out", 0))
    yield nbytes
    yield CounterMetricFamily("zfabric_transfer_bytes",
                              "Bytes workers fetched from each other", value=c.get(
                                  "transfer_bytes", 0))
    yield CounterMetricFamily("zfabric_tasks_finished", "Tasks finished",
                              value=c.get("finished", 0))
    yield CounterMetricFamily("zfabric_tasks_erred", "Tasks failed", value=c.get("erred", 0))
    events = CounterMetricFamily("zfabric_events", "Scheduler events, by kind", labels=["kind"])
    for kind, n in (snap.get("event_counts") or {}).items():
        events.add_metric([kind], n)
    yield events


class _Collector:
    def __init__(self, snap: dict):
        self.snap = snap

    def collect(self):
        yield from families(self.snap)


def render(snap: dict) -> bytes:
    """The text exposition of a snapshot; ImportError without prometheus_client."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap))
    return generate_latest(registry)
