"""Root tasks placed in runs (zfabric.scheduler.runs, through SchedulerState, sans-IO): the
leaves of one submitted graph go to a worker in runs of neighbours, so the reduction above a
pair finds both on one worker; separate submits, restricted tasks and user priorities are
placed as before; the work per decision does not grow with the number of workers."""

from __future__ import annotations

from test_scheduler_state import A1, A2, W1, W2, C, err, finish, given, submit, task

from zfabric import protocol
from zfabric.scheduler.runs import MIN_PER_THREAD, wants_runs


def tree(leaves: int) -> list:
    """A binary reduction tree over ``leaves`` roots, in ``dask.order``'s order: each pair of
    leaves, then their sum, then the sum above two sums as soon as both exist..."""
    out: list = []

    def build(lo: int, hi: int) -> str:
        if hi - lo == 1:
            out.append(task(f"leaf-{lo}"))
            return f"leaf-{lo}"
        mid = (lo + hi) // 2
        left, right = build(lo, mid), build(mid, hi)
        key = f"sum-{lo}-{hi}"
        out.append(task(key, [left, right]))
        return key

    build(0, leaves)
    return out


def computes(out: dict) -> dict[bytes, list]:
    """The compute items each worker was sent in ``out``."""
    return {w: [item for op in ops if op["op"] == "compute" for item in op["tasks"]]
            for w, ops in out.items() if w != C}


def run_all(state, out: dict, *, limit: int = 100_000) -> tuple[dict, dict]:
    """Let the workers run what they were given, one task each in turn, oldest first (a
    worker of one thread runs in order). ``out``: the ops sent so far. Returns the worker
    that ran each key, and each key's last compute item."""
    where: dict[str, bytes] = {}
    items: dict[str, list] = {}

    def take(out: dict) -> None:
        for sent in computes(out).values():
            for item in sent:
                items[item[0]] = item

    take(out)
    for _ in range(limit):
        busy = [ws for ws in state.workers.values() if ws.processing]
        if not busy:
            break
        for ws in busy:
            key = next(iter(ws.processing))
            where[key] = ws.ident
            take(finish(state, ws.ident, key, nbytes=8 * 2**20, value=None))
    return where, items


def test_the_leaves_of_a_tree_go_in_runs_and_their_sums_fetch_nothing():
    # Given 2 workers of 1 thread
    state = given((W1, A1), (W2, A2))
    # When a tree over 64 leaves (values of 8 MB, held by the workers) comes in one op
    where, items = run_all(state, submit(state, *tree(64)))
    # Then every task ran, and the pairs summed at the first level ran on one worker (each
    # placed alone, the leaves took turns: every pair was split)
    assert len(where) == 64 + 63
    pairs = [(f"leaf-{i}", f"leaf-{i + 1}") for i in range(0, 64, 2)]
    together = sum(where[a] == where[b] for a, b in pairs)
    assert together >= 0.9 * len(pairs), together
    # and a first-level sum was sent where both its leaves were: nothing to fetch
    fetching = [k for k in (f"sum-{i}-{i + 2}" for i in range(0, 64, 2)) if items[k][3]]
    assert len(fetching) <= 0.1 * len(pairs), fetching
    # and both workers had their share
    assert sorted(sum(w == x for w in where.values()) for x in (W1, W2)) [0] >= 40
    state.validate()


def test_separate_submits_still_go_to_separate_workers():
    state = given((W1, A1), (W2, A2))
    # When two tasks come in two submit ops, then two in one op (not more than the threads)
    first = computes(submit(state, task("a")))
    second = computes(submit(state, task("b")))
    third = computes(submit(state, task("c"), task("d")))
    # Then each op's tasks go to the least loaded worker, as any task
    assert {w: [i[0] for i in items] for w, items in first.items()} == {W1: ["a"]}
    assert {w: [i[0] for i in items] for w, items in second.items()} == {W2: ["b"]}
    assert {w: [i[0] for i in items] for w, items in third.items()} == {W1: ["c"], W2: ["d"]}
    assert not state.reserves.reserved()
    state.validate()


def test_a_batch_gets_runs_only_when_it_has_twice_the_threads():
    assert not wants_runs(3, 2) and wants_runs(4, 2)
    assert wants_runs(2 * MIN_PER_THREAD, 2) and not wants_runs(1, 0)
    state = given((W1, A1), (W2, A2))
    # When 3 root tasks come in one op, on 2 threads: placed as any task
    sent = computes(submit(state, *(task(f"t{i}") for i in range(3))))
    assert {w: [i[0] for i in items] for w, items in sent.items()} == \
        {W1: ["t0", "t2"], W2: ["t1"]}
    state.validate()


def test_restricted_roots_keep_their_workers():
    state = given((W1, A1), (W2, A2))
    # When 64 roots restricted to one worker come in one op
    where, _ = run_all(state, submit(state, *(task(f"t{i}", workers=[A2])
                                              for i in range(64))))
    # Then all of them run there (no run takes them elsewhere)
    assert set(where.values()) == {W2} and len(where) == 64
    assert not state.reserves.reserved()
    state.validate()


def test_a_more_urgent_batch_goes_before_the_runs_already_claimed():
    state = given((W1, A1), (W2, A2))
    submit(state, *(task(f"low-{i}") for i in range(64)))
    assert sum(len(r) for r in state.reserves.reserved().values()) > 0
    sent = {k for ws in state.workers.values() for k in ws.processing}
    # When a batch with a higher user priority comes while both workers are full
    out = submit(state, *(task(f"high-{i}", priority=10) for i in range(64)))
    assert not computes(out)
    # Then, past the tasks the workers had been sent, each runs that batch's tasks before
    # any more of the first batch's (though it claimed a run of these first)
    where, _ = run_all(state, {})
    for w in (W1, W2):
        order = [k.split("-")[0] for k, x in where.items() if x == w and k not in sent]
        assert "high" in order and order == sorted(order), order  # ("high" < "low")
    assert all(ts.state == "memory" for ts in state.tasks.values())
    state.validate()


def test_a_root_of_a_run_that_errs_is_retried_as_before():
    state = given((W1, A1), (W2, A2))
    submit(state, *(task(f"t{i}", retries=1) for i in range(64)))
    # When a task of w1's run errs, with one retry left
    out = err(state, W1, "t0")
    # Then it is queued or sent again, no client hears of it, and everything runs
    assert C not in out and state.tasks["t0"].state in ("queued", "processing")
    where, _ = run_all(state, out)
    assert "t0" in where and all(ts.state == "memory" for ts in state.tasks.values())
    # and when it errs again, with no retry left, its client hears it
    submit(state, *(task(f"u{i}", retries=1) for i in range(64)))
    err(state, W1, "u0")
    for _ in range(100):
        ws = state.tasks["u0"].processing_on
        if ws is not None:
            break
        run_all(state, {}, limit=1)
    out = err(state, ws.ident, "u0")
    assert [op["op"] for op in out[C]] == ["erred"]
    state.validate()


def test_a_worker_that_leaves_gives_its_runs_back():
    state = given((W1, A1), (W2, A2))
    submit(state, *(task(f"t{i}") for i in range(64)))
    assert set(state.reserves.reserved()) == {state.workers[W1], state.workers[W2]}
    # When w1 leaves with its run not started
    state.handle(W1, [{"op": "goodbye", "reason": "closed"}], 2.0)
    # Then w2 runs all of it
    where, _ = run_all(state, state.flush())
    assert set(where.values()) == {W2} and len(where) == 64
    assert all(ts.state == "memory" for ts in state.tasks.values())
    assert not state.reserves.reserved()
    state.validate()


def test_a_worker_that_pauses_gives_its_runs_back():
    state = given((W1, A1), (W2, A2))
    submit(state, *(task(f"t{i}") for i in range(64)))
    # When w1 pauses
    state.handle(W1, [{"op": "worker-status", "status": "paused", "reason": "memory"}], 2.0)
    assert state.workers[W1] not in state.reserves.reserved()
    # Then w2 runs everything (w1 had started nothing)
    where, _ = run_all(state, state.flush())
    assert set(where.values()) == {W2} and len(where) == 64
    assert all(ts.state == "memory" for ts in state.tasks.values())
    state.validate()


def test_a_worker_that_runs_out_takes_half_of_another_ones_run():
    state = given((W1, A1), (W2, A2))
    submit(state, *(task(f"t{i}") for i in range(64)))
    # When w1 runs everything it was given and claimed, and w2 nothing
    for i in range(32):
        finish(state, W1, f"t{i}")
    # Then w1 took part of w2's run, from its tail: w2 keeps the front of its run, which
    # it goes on with
    w1, w2 = state.workers[W1], state.workers[W2]
    mine = list(w1.processing) + [ts.key for ts in state.reserves.reserved().get(w1, [])]
    theirs = list(w2.processing) + [ts.key for ts in state.reserves.reserved().get(w2, [])]
    assert mine and sorted(mine + theirs, key=lambda k: int(k[1:])) == \
        [f"t{i}" for i in range(32, 64)]
    assert theirs == [f"t{i}" for i in range(32, 32 + len(theirs))]
    assert len(theirs) < 32
    state.validate()


def _work_per_task(nworkers: int) -> float:
    state = given()
    for i in range(nworkers):
        ident = f"w{i}".encode()
        state.handle(ident, [protocol.hello("worker", ident.decode(),
                                            address=f"tcp://10.1.{i // 250}.{i % 250}:1",
                                            nthreads=1)], 0.0)
    state.flush()
    state.candidates.examined = state.reserves.examined = 0
    where, _ = run_all(state, submit(state, *(task(f"t{i}") for i in range(20 * nworkers))))
    assert len(where) == 20 * nworkers
    state.validate()
    return (state.candidates.examined + state.reserves.examined) / len(where)


def test_the_work_per_task_does_not_grow_with_the_workers():
    # Given 10, then 1,000 workers running a batch of 20 roots a thread in runs (claims,
    # refills from the reserves, thefts at the end)
    small, large = _work_per_task(10), _work_per_task(1000)
    # Then the workers and reserves looked at per task stay a small constant: a decision
    # that scanned the workers would look at 1,000 per task
    assert large <= 4 and large <= 2 * small + 1, (small, large)
