"""Pushed events (zfabric.scheduler.subscriptions), sans-IO: feed the scheduler ops with an
explicit ``now`` and read what it sends. An event reaches its subscribers through an index
(never a scan of the clients); a subscriber that does not take its events costs a bounded
queue and learns how many it missed; a client's subscriptions end with it; a malformed
subscribe is answered and the loop goes on."""

from __future__ import annotations

from zfabric import protocol
from zfabric.config import Config
from zfabric.scheduler.state import SchedulerState
from zfabric.scheduler.subscriptions import BATCH_EVENTS, WINDOW

W = b"w1"
C = b"client-1"


def given(nclients: int = 1, **config) -> SchedulerState:
    state = SchedulerState(address="tcp://sched:8786", config=Config(**config))
    state.handle(W, [protocol.hello("worker", "w1", address="tcp://10.0.0.1:1", nthreads=1)],
                 0.0)
    for i in range(nclients):
        peer = C if i == 0 else f"client-{i + 1}".encode()
        state.handle(peer, [protocol.hello("client", peer.decode())], 0.0)
    state.flush()
    return state


def subscribe(state, peer=C, rid=1, now=0.5, **args):
    state.handle(peer, [{"op": "request", "id": rid, "kind": "subscribe", "args": args}], now)
    return state.flush().get(peer, [])


def events(out: dict, peer=C) -> list[dict]:
    return [op for op in out.get(peer, []) if op["op"] == "events"]


def log_event(state, topic, msg, peer=C, now=1.0):
    state.handle(peer, [{"op": "request", "id": 99, "kind": "log-event",
                         "args": {"topic": topic, "msg": msg}}], now)


def run_task(state, key, now=1.0):
    state.handle(C, [{"op": "submit", "tasks": [[key, b"p", [], None]]}], now)
    state.handle(W, [{"op": "finished", "tasks": [[key, 8, b"v", 0.001]]}], now)


def test_a_topic_event_reaches_only_its_subscribers_among_a_thousand_clients():
    # Given 1,000 clients, of which one follows topic "t"
    state = given(1000)
    assert subscribe(state, id=3, what="topic", topic="t") == [
        {"op": "reply", "id": 1, "result": True}]
    # When another client logs an event under "t" and one under "u"
    other = b"client-500"
    log_event(state, "t", {"x": 1}, peer=other)
    assert state.subs.work == 1  # the event touched its one subscriber, not the clients
    log_event(state, "u", {"x": 2}, peer=other)
    out = state.flush()
    # Then the subscriber gets the first, as it was logged, under its subscription's id
    [op] = events(out)
    assert op["id"] == 3 and [e[1] for e in op["items"]] == [{"x": 1}]
    assert all(not events(out, p) for p in out if p != C)


def test_transitions_are_pushed_as_made_filtered_by_key_or_prefix():
    state = given()
    subscribe(state, id=1, what="transitions")
    subscribe(state, rid=2, id=2, what="transitions", keys=["inc-2"])
    subscribe(state, rid=3, id=3, what="transitions", prefixes=["dec"], keys=["dec-1"])
    run_task(state, "inc-1")
    run_task(state, "inc-2")
    run_task(state, "dec-1")
    out = state.flush()
    by_id: dict[int, list] = {}
    for op in events(out):
        by_id.setdefault(op["id"], []).extend(op["items"])
    # every task, each move once, with the worker and the stimulus that caused it
    assert [(k, a, b) for k, a, b, *_ in by_id[1]] == [
        ("inc-1", "new", "processing"), ("inc-1", "processing", "memory"),
        ("inc-2", "new", "processing"), ("inc-2", "processing", "memory"),
        ("dec-1", "new", "processing"), ("dec-1", "processing", "memory")]
    assert {item[4] for item in by_id[1]} == {"tcp://10.0.0.1:1"}
    assert by_id[1][0][5].startswith("submit-") and by_id[1][1][5].startswith("finished-")
    assert {k for k, *_ in by_id[2]} == {"inc-2"}
    # a subscriber that names a key and its prefix hears each of its moves once
    assert [(k, b) for k, a, b, *_ in by_id[3]] == [("dec-1", "processing"),
                                                    ("dec-1", "memory")]


def test_a_subscriber_that_does_not_read_costs_a_bounded_queue_and_learns_what_it_missed():
    # Given a subscriber whose queue holds 50 events and which acknowledges nothing
    state = given()
    subscribe(state, id=1, what="topic", topic="t", queue=50)
    sent = []
    # When 3,000 events are logged, a turn of the loop after each
    for i in range(3000):
        log_event(state, "t", i)
        sent.extend(events(state.flush()))
    # Then it was sent only its window of batches, and the scheduler keeps at most 50 more
    assert len(sent) == WINDOW
    sub = state.subs.by_peer[C][1]
    assert len(sub.queue) == 50
    assert sub.missed == 3000 - 50 - sum(len(op["items"]) for op in sent)
    # When it takes a batch, the next one tells it how many it missed
    state.handle(C, [{"op": "events-ack", "id": 1}], 2.0)
    [op] = events(state.flush())
    assert op["missed"] == sub.missed + op.get("missed", 0) and op["missed"] > 2900
    assert len(op["items"]) == 50 and op["items"][0][1] == sent[-1]["items"][-1][1] + 1


def test_a_batch_carries_at_most_batch_events_and_acks_release_the_rest():
    state = given()
    subscribe(state, id=1, what="topic", topic="t")
    for i in range(BATCH_EVENTS * 3 + 5):
        log_event(state, "t", i)
    got = events(state.flush())  # one batch a turn of the loop, up to the window
    got += events(state.flush()) + events(state.flush())
    assert [len(op["items"]) for op in got] == [BATCH_EVENTS] * WINDOW
    items = [e[1] for op in got for e in op["items"]]
    while len(items) < BATCH_EVENTS * 3 + 5:
        state.handle(C, [{"op": "events-ack", "id": 1}], 2.0)
        items += [e[1] for op in events(state.flush()) for e in op["items"]]
    assert items == list(range(BATCH_EVENTS * 3 + 5))  # in order, none lost


def test_subscriptions_end_with_their_client_and_on_unsubscribe():
    state = given(2)
    subscribe(state, id=1, what="transitions")
    subscribe(state, rid=2, id=2, what="topic", topic="t")
    assert state.subs.watching and state.subs.count() == 2
    state.handle(C, [{"op": "request", "id": 3, "kind": "unsubscribe", "args": {"id": 2}}],
                 1.0)
    assert state.flush()[C] == [{"op": "reply", "id": 3, "result": True}]
    assert state.subs.topics == {}
    state.handle(C, [{"op": "goodbye"}], 1.0)
    state.flush()
    assert not state.subs.watching and state.subs.count() == 0
    assert state.subs.every_task == {} and state.subs.by_peer == {}
    run_task_from_other = [{"op": "submit", "tasks": [["x-1", b"p", [], None]]}]
    state.handle(b"client-2", run_task_from_other, 2.0)
    assert not events(state.flush(), C)


def test_a_malformed_subscribe_is_answered_and_the_ops_beside_it_still_apply():
    state = given()
    bad = [{"op": "request", "id": 1, "kind": "subscribe", "args": {"id": 1, "what": "all"}},
           {"op": "request", "id": 2, "kind": "subscribe",
            "args": {"id": 2, "what": "transitions", "keys": "inc-1"}},
           {"op": "request", "id": 3, "kind": "subscribe", "args": {"what": "topic"}},
           {"op": "request", "id": 4, "kind": "subscribe",
            "args": {"id": 4, "what": "topic", "topic": "t", "queue": 0}},
           {"op": "events-ack", "id": "x"},  # (checked at decode in the shell)
           {"op": "request", "id": 5, "kind": "subscribe",
            "args": {"id": 5, "what": "topic", "topic": "t"}}]
    errors = []
    for op in bad:
        try:
            protocol.check(op)
        except Exception as exc:
            errors.append(str(exc))
            continue
        state.handle(C, [op], 1.0)
    assert errors == ["op 'events-ack' field 'id' must be int, got str"]
    out = state.flush()[C]
    refused = {op["request"]: op["message"] for op in out if op["op"] == "error"}
    assert "what" in refused[1] and "keys" in refused[2]
    assert "id" in refused[3] and "queue" in refused[4]
    assert [op for op in out if op["op"] == "reply"] == [{"op": "reply", "id": 5,
                                                          "result": True}]
    assert list(state.subs.topics) == ["t"]
    # a worker may not subscribe
    state.handle(W, [{"op": "request", "id": 6, "kind": "subscribe",
                      "args": {"id": 6, "what": "topic", "topic": "t"}}], 1.0)
    assert any("only clients" in op.get("message", "") for op in state.flush()[W])


def test_a_topic_subscription_after_a_time_gets_the_events_logged_since():
    state = given()
    state.observe.wall_offset = 1000.0
    log_event(state, "print", "early", now=1.0)
    log_event(state, "print", "earlier", now=0.2)
    state.flush()
    [reply] = subscribe(state, id=1, what="topic", topic="print", after=1000.5, now=2.0)
    assert [e[1] for e in reply["result"]] == ["early"]


def test_nobody_following_transitions_costs_one_test():
    state = given()
    assert not state.subs.watching
    run_task(state, "inc-1")
    assert not events(state.flush())
    state.validate()
