"""What workers report for watching (heartbeat metrics, transfers, profiles, log lines),
checked where the scheduler takes it in: each cleaner keeps the well-formed entries, bounded,
and drops the rest, so that no report can raise in the scheduler's loop or reach the dashboard
as NaN or megabytes of text. (The ops that carry them are checked by :mod:`zfabric.protocol`;
these are the free-form parts inside.)"""

from __future__ import annotations

import math

from .protocol import finite

__all__ = ["clean_logs", "clean_metrics", "clean_profile", "clean_transfers"]


def clean_metrics(metrics) -> dict:
    """A worker's heartbeat metrics, finite numbers only (at most 64 of them)."""
    if type(metrics) is not dict:
        return {}
    out = {}
    for k, v in metrics.items():
        if type(k) is str and len(k) <= 64 and (
                type(v) is int or (type(v) is float and math.isfinite(v))):
            out[k] = v
            if len(out) >= 64:
                break
    return out


#: Transfers one worker report may carry (a worker sends at most 1000).
MAX_TRANSFERS = 1000


def clean_transfers(items) -> list[tuple]:
    """The well-formed entries of a worker's ``transfers`` report, as tuples
    ``(peer address, start, stop, nbytes, nkeys)``: a printable address of at most 300
    characters, finite times, byte and key counts from 0 to 2**62. Others are dropped (they
    would raise in the scheduler's loop, or reach the dashboard as NaN or megabytes of text);
    at most :data:`MAX_TRANSFERS` are kept."""
    if type(items) is not list:
        return []
    out = []
    for item in items[:MAX_TRANSFERS]:
        if type(item) is not list or len(item) != 5:
            continue
        peer, start, stop, nbytes, nkeys = item
        if (type(peer) is str and len(peer) <= 300 and peer.isprintable()
                and finite(start) and finite(stop)
                and type(nbytes) is int and 0 <= nbytes <= 1 << 62
                and type(nkeys) is int and 0 <= nkeys <= 1 << 62):
            out.append((peer, float(start), float(stop), nbytes, nkeys))
    return out


#: Nodes one worker's profile report may carry, and how deep a tree may go.
MAX_PROFILE_NODES = 10_000
MAX_PROFILE_DEPTH = 130


def clean_profile(report) -> dict:
    """The well-formed trees of a worker's ``profile`` report (see
    :mod:`zfabric.worker.profiler`): ``{group: [label, count, [child, ...]]}`` with string
    names and labels of at most 500 characters, counts from 0 to 2**31. A malformed tree is
    dropped whole, and so is what lies past :data:`MAX_PROFILE_NODES` nodes or
    :data:`MAX_PROFILE_DEPTH` levels."""
    if type(report) is not dict:
        return {}
    budget = [MAX_PROFILE_NODES]
    out = {}
    for group, tree in report.items():
        if type(group) is str and len(group) <= 500 and _profile_node(tree, 0, budget):
            out[group] = tree
        if budget[0] <= 0:
            break
    return out


def _profile_node(node, depth: int, budget: list) -> bool:
    budget[0] -= 1
    if (budget[0] < 0 or depth > MAX_PROFILE_DEPTH or type(node) is not list or len(node) != 3
            or type(node[0]) is not str or len(node[0]) > 500 or type(node[1]) is not int
            or not 0 <= node[1] <= 1 << 31 or type(node[2]) is not list):
        return False
    return all(_profile_node(child, depth + 1, budget) for child in node[2])


#: Log lines one worker report may carry.
MAX_LOG_LINES = 50


def clean_logs(items) -> list[tuple[str, str]]:
    """The well-formed lines of a worker's ``logs`` report: ``(level, text)``, a level name of
    at most 20 characters, text cut to 1,000; at most :data:`MAX_LOG_LINES`."""
    if type(items) is not list:
        return []
    out = []
    for item in items[:MAX_LOG_LINES]:
        if (type(item) is list and len(item) == 2 and type(item[0]) is str
                and len(item[0]) <= 20 and type(item[1]) is str):
            out.append((item[0], item[1][:1000]))
    return out
