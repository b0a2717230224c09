"""The Client's records (zfabric.client_core), op by op: no sockets, no scheduler."""

from __future__ import annotations

import asyncio

import pytest

from zfabric.client_core import ClientCore
from zfabric.config import from_env
from zfabric.errors import ClosedError, SchedulerLost


def make_core(**env) -> tuple[ClientCore, list[int]]:
    core = ClientCore(from_env(**env), address="tcp://127.0.0.1:1")
    core.status = "running"
    wakes: list[int] = []
    core.wake = lambda: wakes.append(1)
    return core, wakes


async def test_request_ids_are_fresh_and_replies_reach_their_request():
    core, _ = make_core()
    core.loop = asyncio.get_running_loop()
    (r1, f1), (r2, f2) = core.new_request(), core.new_request()
    assert r1 != r2
    core.answer(r2, {"op": "reply", "id": r2, "result": 2})
    core.answer(r1, {"op": "reply", "id": r1, "result": 1})
    core.answer(r1, {"op": "reply", "id": r1, "result": "again"})  # a late duplicate: ignored
    assert (await f1)["result"] == 1 and (await f2)["result"] == 2
    assert core.requests == {}


async def test_request_sends_one_op_and_returns_the_result():
    core, wakes = make_core()
    core.loop = asyncio.get_running_loop()
    core.epoch = "e1"
    task = asyncio.ensure_future(core.request("info", n=1))
    await asyncio.sleep(0)
    [op] = core.take_outbox()
    assert op == {"op": "request", "id": op["id"], "kind": "info", "args": {"n": 1}}
    assert wakes == [1]
    core.answer(op["id"], {"op": "reply", "id": op["id"], "result": {"workers": {}}})
    assert await task == {"workers": {}}


async def test_a_refused_request_raises_and_fail_requests_fails_the_waiting_ones():
    core, _ = make_core()
    core.loop = asyncio.get_running_loop()
    core.epoch = "e1"
    bad = asyncio.ensure_future(core.request("nbytes", keys=7))
    waiting = asyncio.ensure_future(core.request("info"))
    await asyncio.sleep(0)
    first, _ = core.take_outbox()
    core.answer(first["id"], {"op": "reply", "id": first["id"], "error": "keys: not a list",
                              "kind": "ValueError"})
    with pytest.raises(ValueError, match="not a list"):
        await bad
    core.fail_requests(lambda: ClosedError("the client was closed"))
    with pytest.raises(ClosedError):
        await waiting
    assert core.requests == {}


def test_releases_leave_once_and_before_any_later_op():
    core, wakes = make_core()
    for key in ("a", "b"):
        core.inc_ref(key)
        core.get_state(key, want=False)
    core.dec_ref("a")
    core.dec_ref("b")
    assert wakes == [1]  # one flush asked for, however many releases
    core.send({"op": "submit", "tasks": [["a", b"", [], None, "f"]], "functions": {}})
    ops = core.take_outbox()
    assert [op["op"] for op in ops] == ["release", "submit"]
    assert ops[0]["keys"] == ["a", "b"]
    assert core.take_outbox() == []
    core.inc_ref("c")
    core.dec_ref("c")
    assert core.take_outbox() == [{"op": "release", "keys": ["c"]}]


def test_a_key_still_referenced_is_not_released_and_a_closed_client_releases_nothing():
    core, _ = make_core()
    core.inc_ref("a")
    core.inc_ref("a")
    core.get_state("a", want=False)
    core.dec_ref("a")
    assert "a" in core.states and core.take_outbox() == []
    core.status = "closed"
    core.dec_ref("a")
    assert "a" not in core.states and core.take_outbox() == []


def test_revive_keeps_a_live_state_and_renews_a_cancelled_or_lost_one():
    core, _ = make_core()
    with core.lock:
        st, new = core.revive("k")
        assert new and core.states["k"] is st
        again, new = core.revive("k")
        assert again is st and not new
        st.cancel("no longer needed")
        fresh, new = core.revive("k")
        assert new and fresh is not st and fresh.status == "pending"
        fresh.fail(None, SchedulerLost("gone"))
        revived, new = core.revive("k")
        assert new and revived is not fresh
        revived.fail(None, ValueError("the task's own error"))
        kept, new = core.revive("k")
        assert kept is revived and not new


def test_revive_takes_a_held_task_out_of_the_submit_window():
    core, _ = make_core(SUBMIT_WINDOW_TASKS=1)
    with core.lock:
        running, _ = core.revive("a")
        core.window.sent(running)
        held, _ = core.revive("b")
        core.window.hold(held, b"args", [], None, "f", b"func")
        assert core.window.held == 1
        held.cancel()
        core.revive("b")
        assert core.window.held == 0


def test_a_lost_scheduler_fails_pending_futures_and_requests():
    core, _ = make_core()
    loop = asyncio.new_event_loop()
    try:
        core.loop = loop
        core.epoch = "e1"
        done = core.get_state("done", want=False)
        done.finish(b"v", None, 1)
        pending = core.get_state("pending", want=False)
        _, fut = core.new_request()
        core.fail_pending(lambda: SchedulerLost("gone; resubmit"), lambda: SchedulerLost("gone"))
        assert core.epoch is None
        assert done.status == "finished"
        assert pending.status == "error" and isinstance(pending.exception(), SchedulerLost)
        assert isinstance(fut.exception(), SchedulerLost)
        with pytest.raises(ClosedError):
            core.status = "closed"
            core.check_open()
    finally:
        loop.close()
