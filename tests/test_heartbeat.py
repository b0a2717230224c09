"""zfabric.heartbeat.Liveness: pure, time comes in as an argument."""

from __future__ import annotations

from zfabric.heartbeat import Liveness


def test_silent_peers_expire_after_the_ttl():
    # Given two peers heard at t=0 and t=3, with a 5 s ttl
    live = Liveness(ttl_s=5.0)
    live.beat("a", now=0.0)
    live.beat("b", now=3.0)
    # Then nobody has expired at t=5 (exactly the ttl), only a at t=5.5, both at t=8.1
    assert live.expired(5.0) == []
    assert live.expired(5.5) == ["a"]
    assert sorted(live.expired(8.1)) == ["a", "b"]


def test_a_beat_renews_and_forget_removes():
    live = Liveness(ttl_s=1.0)
    live.beat("a", now=0.0)
    live.beat("a", now=10.0)
    assert live.expired(10.5) == [] and live.last_seen("a") == 10.0
    live.forget("a")
    live.forget("never-seen")  # harmless
    assert live.expired(100.0) == [] and live.last_seen("a") is None
