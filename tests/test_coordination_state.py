"""Shared state in the scheduler, sans-IO: coord ops in (through the protocol's door), the
exact replies out. Every scenario ends with ``state.validate()``."""

from __future__ import annotations

from test_scheduler_state import A1, C2, W1, C, finish, given, submit, task

from zfabric import protocol
from zfabric.scheduler.records import HELD

C3 = b"client-3"


def coord(state, peer, kind, name="x", rid=1, now=1.0, **fields) -> dict:
    """Send one coord op the way the shell does (decoded at the door); the flushed outbox."""
    ops, _ = protocol.decode(protocol.encode(
        [{"op": "coord", "id": rid, "kind": kind, "name": name, **fields}]))
    state.handle(peer, ops, now)
    return state.flush()


def reply(rid, result=None) -> dict:
    return {"op": "reply", "id": rid, "result": result}


def refusal(out: dict, peer: bytes) -> tuple[str, str]:
    [op] = out[peer]
    return op["type"], op["error"]


def acquire(state, peer, lease, rid=1, timeout=None, now=1.0, max_leases=1, lease_timeout=None):
    return coord(state, peer, "sem-acquire", rid=rid, now=now, max_leases=max_leases,
                 lease=lease, timeout=timeout, lease_timeout=lease_timeout)


# ---------------------------------------------------------------------------- locks and semaphores


def test_lock_waiter_is_woken_by_the_release_in_order():
    state = given(clients=(C, C2, C3))
    assert acquire(state, C, "l1") == {C: [reply(1, True)]}
    # When two more clients ask, they wait (no reply)
    assert acquire(state, C2, "l2", rid=7) == {}
    assert acquire(state, C3, "l3", rid=9) == {}
    # Then the release wakes the first waiter only, in the same flush
    assert coord(state, C, "sem-release", rid=2, lease="l1") == {C: [reply(2, True)],
                                                                  C2: [reply(7, True)]}
    assert coord(state, C2, "sem-release", rid=8, lease="l2") == {C2: [reply(8, True)],
                                                                   C3: [reply(9, True)]}
    # And a lease released twice reports False (it lapsed), never an error
    assert coord(state, C2, "sem-release", rid=10, lease="l2") == {C2: [reply(10, False)]}
    state.validate()


def test_semaphore_counts_leases_and_refuses_another_max_leases():
    state = given(clients=(C, C2))
    for i in range(3):
        assert acquire(state, C, f"l{i}", rid=i, max_leases=3) == {C: [reply(i, True)]}
    assert coord(state, C2, "sem-value", rid=5) == {C2: [reply(5, 3)]}
    assert acquire(state, C2, "n", rid=6, timeout=0, max_leases=3) == {C2: [reply(6, False)]}
    kind, text = refusal(acquire(state, C2, "m", rid=7, max_leases=2), C2)
    assert kind == "ValueError" and "max_leases=3" in text


def test_acquire_timeout_expires_at_the_tick():
    state = given(clients=(C, C2))
    acquire(state, C, "l1")
    assert acquire(state, C2, "l2", rid=4, timeout=1.0, now=10.0) == {}
    state.tick(10.9)
    assert state.flush() == {}
    state.tick(11.05)
    assert state.flush() == {C2: [reply(4, False)]}
    # And the expired waiter does not get the lock later
    assert coord(state, C, "sem-release", rid=2, lease="l1", now=12.0) == {C: [reply(2, True)]}
    assert coord(state, C2, "sem-value", rid=5, now=12.0) == {C2: [reply(5, 0)]}


def test_lease_of_a_client_that_leaves_goes_to_the_waiter_at_once():
    state = given(clients=(C, C2))
    acquire(state, C, "l1")
    acquire(state, C2, "l2", rid=3)
    state.handle(C, [{"op": "goodbye"}], 2.0)
    assert state.flush() == {C2: [reply(3, True)]}
    state.validate()


def test_lease_of_a_task_whose_worker_dies_is_released_at_once():
    # Given a task's client (its hello names its worker) holding a lease, and a waiter
    state = given((W1, A1), clients=(C,))
    state.handle(C2, [protocol.hello("client", "worker-client", worker=A1)], 0.0)
    state.flush()
    acquire(state, C2, "held-by-task")
    acquire(state, C, "l", rid=5)
    # When the worker is declared dead
    state.remove_worker(state.workers[W1], "killed", died=True)
    # Then the waiter gets the lease in the same flush
    assert state.flush()[C] == [reply(5, True)]
    state.validate()


def test_lease_lapses_when_its_holder_is_silent_for_lease_timeout():
    state = given(clients=(C, C2), CLIENT_TTL_S=100.0)
    acquire(state, C, "l1", now=1.0, lease_timeout=5.0)
    acquire(state, C2, "l2", rid=4, now=1.0, lease_timeout=5.0)
    state.handle(C2, [{"op": "heartbeat"}], 5.0)
    state.tick(5.0)
    assert state.flush() == {}
    state.handle(C2, [{"op": "heartbeat"}], 6.5)
    state.tick(6.5)
    assert state.flush() == {C2: [reply(4, True)]}


def test_close_refuses_the_waiters():
    state = given(clients=(C, C2))
    acquire(state, C, "l1")
    acquire(state, C2, "l2", rid=4)
    out = coord(state, C, "sem-close", rid=2)
    assert out[C] == [reply(2)]
    assert refusal({C2: out[C2]}, C2) == ("RuntimeError", "semaphore 'x' was closed")
    assert not state.coord.semaphores


# ---------------------------------------------------------------------------- events


def test_event_set_wakes_every_waiter_and_lives_only_while_needed():
    state = given(clients=(C, C2))
    assert coord(state, C, "event-wait", rid=1, timeout=None) == {}
    assert coord(state, C2, "event-wait", rid=2, timeout=5.0) == {}
    assert coord(state, C, "event-set", rid=3) == {C: [reply(1, True), reply(3)],
                                                  C2: [reply(2, True)]}
    assert coord(state, C2, "event-wait", rid=4, timeout=0) == {C2: [reply(4, True)]}
    coord(state, C, "event-clear", rid=5)
    assert not state.coord.events  # neither set nor waited on: forgotten
    assert coord(state, C2, "event-wait", rid=6, timeout=1.0, now=2.0) == {}
    state.tick(3.1)
    assert state.flush() == {C2: [reply(6, False)]}
    assert not state.coord.events


# ---------------------------------------------------------------------------- variables


def test_variable_get_waits_for_set_and_times_out():
    state = given(clients=(C, C2))
    assert coord(state, C2, "var-get", rid=1, timeout=None) == {}
    item = ["v", b"pickle", []]
    assert coord(state, C, "var-set", rid=2, item=item) == {C2: [reply(1, item)],
                                                            C: [reply(2)]}
    coord(state, C, "var-delete", rid=3)
    assert coord(state, C2, "var-get", rid=4, timeout=2.0, now=5.0) == {}
    state.tick(7.5)
    assert refusal(state.flush(), C2) == ("TimeoutError", "Variable.get timed out")


def test_a_future_in_a_variable_stays_alive_until_replaced():
    state = given((W1, A1))
    submit(state, task("f"))
    finish(state, W1, "f", value=None, nbytes=10**7)
    coord(state, C, "var-set", rid=1, item=["f", "f"])
    # When the client releases its own future, the Variable keeps the result
    state.handle(C, [{"op": "release", "keys": ["f"]}], 3.0)
    assert state.flush() == {}
    assert state.tasks["f"].state == "memory" and state.tasks["f"].wanted_by(state.clients[HELD])
    # When the value is replaced, the worker is told to free it
    assert coord(state, C, "var-set", rid=2, item=["v", b"1", []]) == {
        W1: [{"op": "free", "keys": ["f"]}], C: [reply(2)]}
    assert "f" not in state.tasks
    state.validate()


def test_setting_an_unknown_future_is_refused():
    state = given()
    kind, text = refusal(coord(state, C, "var-set", rid=1, item=["f", "nope"]), C)
    assert kind == "ValueError" and "'nope' is not known" in text


# ---------------------------------------------------------------------------- queues


def q(state, peer, kind, rid, maxsize=0, now=1.0, **fields):
    return coord(state, peer, kind, name="q", rid=rid, maxsize=maxsize, now=now, **fields)


def v(n: int) -> list:
    return ["v", bytes([n]), []]


def test_queue_is_fifo_with_maxsize_and_batches():
    state = given(clients=(C, C2))
    assert q(state, C, "queue-put", 1, maxsize=2, item=v(1), timeout=None) == {C: [reply(1)]}
    assert q(state, C, "queue-put", 2, maxsize=2, item=v(2), timeout=None) == {C: [reply(2)]}
    # When full, a put waits
    assert q(state, C, "queue-put", 3, maxsize=2, item=v(3), timeout=None) == {}
    # Then a get takes the oldest and lets the waiting put in
    assert q(state, C2, "queue-get", 4, maxsize=2, timeout=None, batch=False) == {
        C: [reply(3)], C2: [reply(4, v(1))]}
    assert q(state, C2, "queue-get", 5, maxsize=2, timeout=None, batch=True) == {
        C2: [reply(5, [v(2), v(3)])]}
    # A batch of 2 waits for two items
    assert q(state, C2, "queue-get", 6, maxsize=2, timeout=None, batch=2) == {}
    q(state, C, "queue-put", 7, maxsize=2, item=v(4), timeout=None)
    assert q(state, C, "queue-put", 8, maxsize=2, item=v(5), timeout=None) == {
        C: [reply(8)], C2: [reply(6, [v(4), v(5)])]}
    kind, _ = refusal(q(state, C2, "queue-get", 9, maxsize=3, timeout=0, batch=False), C2)
    assert kind == "ValueError"  # another maxsize


def test_queue_get_and_put_time_out():
    state = given()
    q(state, C, "queue-get", 1, maxsize=1, timeout=1.0, batch=False)
    state.tick(2.5)
    assert refusal(state.flush(), C) == ("TimeoutError", "Queue.get timed out")
    q(state, C, "queue-put", 2, maxsize=1, item=v(1), timeout=None, now=3.0)
    kind, _ = refusal(q(state, C, "queue-put", 3, maxsize=1, item=v(2), timeout=0, now=3.0), C)
    assert kind == "TimeoutError"


def test_queue_hands_a_future_to_its_reader_and_is_forgotten_when_closed():
    state = given((W1, A1), clients=(C, C2))
    submit(state, task("f"))
    finish(state, W1, "f", value=None, nbytes=10**7)
    q(state, C, "queue-put", 1, item=["f", "f"], timeout=None)
    state.handle(C, [{"op": "release", "keys": ["f"]}], 2.0)
    state.flush()
    # When C2 takes the item, C2 now wants the key (its Future keeps it alive)
    assert q(state, C2, "queue-get", 2, timeout=None, batch=False) == {C2: [reply(2, ["f", "f"])]}
    assert state.tasks["f"].wanted_by(state.clients[C2])
    assert not state.tasks["f"].wanted_by(state.clients[HELD])
    # And its want (the Future's) is answered with the state
    state.handle(C2, [{"op": "want", "keys": ["f"]}], 3.0)
    assert state.flush() == {C2: [{"op": "memory", "items": [["f", None, [A1], 10**7]]}]}
    # When both clients close the queue, it is forgotten with the items left in it
    q(state, C, "queue-put", 3, item=v(1), timeout=None)
    q(state, C, "queue-close", 4)
    assert "q" in state.coord.queues
    state.handle(C2, [{"op": "goodbye"}], 4.0)
    assert "q" not in state.coord.queues
    state.validate()


# ---------------------------------------------------------------------------- datasets


def test_datasets_publish_override_list_unpublish():
    state = given((W1, A1), clients=(C, C2))
    submit(state, task("f"))
    finish(state, W1, "f", value=None, nbytes=10**7)
    item = ["v", b"obj", ["f"]]
    assert coord(state, C, "ds-publish", name="d", item=item, override=False) == {C: [reply(1)]}
    state.handle(C, [{"op": "goodbye"}], 2.0)  # the publisher leaves; the data stays
    assert state.flush() == {}
    assert coord(state, C2, "ds-list", name="", rid=2) == {C2: [reply(2, ["d"])]}
    assert coord(state, C2, "ds-get", name="d", rid=3) == {C2: [reply(3, item)]}
    kind, text = refusal(coord(state, C2, "ds-publish", name="d", rid=4, item=v(1),
                               override=False), C2)
    assert kind == "KeyError" and "override=True" in text
    kind, _ = refusal(coord(state, C2, "ds-get", name="other", rid=5), C2)
    assert kind == "KeyError"
    # Unpublishing releases the future it held
    assert coord(state, C2, "ds-unpublish", name="d", rid=6) == {
        W1: [{"op": "free", "keys": ["f"]}], C2: [reply(6)]}
    state.validate()


# ---------------------------------------------------------------------------- the door


def test_malformed_coord_ops_are_refused_and_the_rest_is_served():
    state = given()
    bad = [
        {"op": "coord", "id": 1, "kind": "nope", "name": "x"},
        {"op": "coord", "id": 2, "kind": "var-set", "name": "x", "item": ["f"]},
        {"op": "coord", "id": 3, "kind": "sem-acquire", "name": "x", "max_leases": 0,
         "lease": "l", "timeout": None, "lease_timeout": None},
        {"op": "coord", "id": 4, "kind": "event-wait", "name": "x", "timeout": -1},
        {"op": "coord", "id": 5, "kind": "queue-get", "name": "x", "maxsize": 0,
         "timeout": None, "batch": "yes"},
    ]
    for op in bad:
        try:
            protocol.check(op)
        except protocol.RemoteProtocolError:
            continue
        raise AssertionError(f"accepted {op}")
    # the state refuses them too (a peer may skip the door's encoding step)
    state.handle(C, [bad[1], {"op": "coord", "id": 9, "kind": "event-is-set", "name": "x"}], 1.0)
    out = state.flush()[C]
    assert out[0]["op"] == "reply" and out[0]["type"] == "ValueError" and out[0]["id"] == 2
    assert out[1] == reply(9, False)
    state.validate()


