"""The client's submit window: how many of its tasks the scheduler holds unfinished, at most.

A client that submits far more than a cluster can run (``client.map(f, range(10**7))``, or a
loop of submits fed by a generator) must not push the scheduler out of memory. The Client keeps
at most ``SUBMIT_WINDOW_TASKS`` of its tasks *in flight* -- sent to the scheduler and neither
finished, failed nor cancelled -- and holds the rest here, as the pickled calls it would have
sent (a few dozen bytes for a small call). Results that come back make room, and held tasks
leave in priority order: highest ``priority`` first, then in submission order, so a
high-priority submit overtakes low-priority tasks still held here. A held task whose
dependency is also still held takes the dependency with it (the scheduler must know a task's
dependencies when it receives it).

Pure bookkeeping, no I/O: the Client calls it under its lock and sends what
:meth:`SubmitWindow.take` returns. Memory matters here (millions of futures), so the mark of
each task lives in its :class:`~zfabric.futures.FutureState` (slot ``window``: None, ``True``
when in flight, or the held entry ``(state, args pickle, dependency keys, options, function
id)``), and held entries wait in one FIFO per priority; an entry whose state no longer points
at it was dropped and is skipped.
"""

from __future__ import annotations

from collections import deque

__all__ = ["SubmitWindow"]

_NO_DEPS: tuple = ()


class SubmitWindow:
    """Tasks in flight at the scheduler (at most ``limit``) and tasks held back (see module)."""

    __slots__ = ("batch", "functions", "held", "inflight", "limit", "queues")

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"SUBMIT_WINDOW_TASKS must be at least 1, got {limit}")
        self.limit = int(limit)
        # Held tasks leave once this much room is free (or nothing is in flight), so that
        # they go in batches rather than one message per result that comes back.
        self.batch = max(1, min(1000, self.limit // 4))
        self.inflight = 0
        self.held = 0
        self.functions: dict[str, list] = {}  # function id -> [pickle, held tasks using it]
        self.queues: dict[int, deque] = {}  # priority -> held entries, oldest first

    def full(self) -> bool:
        """Whether a new task must be held (no room, or others already wait)."""
        return bool(self.held) or self.inflight >= self.limit

    def ready(self) -> bool:
        """Whether held tasks should leave now."""
        return bool(self.held) and (self.inflight == 0
                                    or self.limit - self.inflight >= self.batch)

    def sent(self, st) -> None:
        """``st``'s task went to the scheduler."""
        if st.window is not True:
            st.window = True
            self.inflight += 1

    def hold(self, st, abytes: bytes, deps: list, opts: dict | None, fid: str,
             fbytes: bytes) -> None:
        """Keep a task's pickled call until there is room for it."""
        prio = int(opts.get("priority") or 0) if opts else 0
        entry = (st, abytes, tuple(deps) if deps else _NO_DEPS, opts, fid)
        st.window = entry
        self.held += 1
        q = self.queues.get(prio)
        if q is None:
            q = self.queues[prio] = deque()
        q.append(entry)
        f = self.functions.get(fid)
        if f is None:
            self.functions[fid] = [fbytes, 1]
        else:
            f[1] += 1

    def done(self, st) -> None:
        """``st``'s task finished, failed or was cancelled: room for one more. Also for a
        state that was never sent (then nothing changes)."""
        w = st.window
        if w is True:
            st.window = None
            self.inflight -= 1

    def drop(self, st) -> bool:
        """Forget ``st``'s task (its future was released or cancelled); True if it was still
        held (then it never reached the scheduler)."""
        w = st.window
        if w is None:
            return False
        st.window = None
        if w is True:
            self.inflight -= 1
            return False
        self.held -= 1
        self._unref(w[4])
        return True

    def clear(self, states) -> None:
        """Forget everything (the scheduler is gone, or a restart); ``states``: all of them."""
        for st in states:
            st.window = None
        self.inflight = self.held = 0
        self.functions.clear()
        self.queues.clear()

    def take(self, states: dict) -> tuple[list, dict]:
        """Held tasks that now fit, highest priority first, as submit items ``[key, args,
        deps, opts, fid]``, and the pickles of their functions; ``states`` maps keys to
        FutureStates (to find held dependencies)."""
        tasks: list = []
        functions: dict = {}
        while self.held and self.inflight < self.limit:
            prio = max(self.queues)
            q = self.queues[prio]
            while q and self.inflight < self.limit:
                entry = q.popleft()
                if entry[0].window is entry:
                    self._release(entry, states, tasks, functions)
            if not q:
                del self.queues[prio]
        if not self.held:
            self.queues.clear()  # drop the entries of dropped tasks too
        return tasks, functions

    def _release(self, entry: tuple, states: dict, tasks: list, functions: dict) -> None:
        # Held dependencies go first, each before what needs it (a post-order walk); they may
        # take the window a little past its limit.
        order = []
        stack: list = [(entry, False)]
        while stack:
            e, expanded = stack.pop()
            st = e[0]
            if expanded:
                order.append(e)
                continue
            if st.window is not e:
                continue
            st.window = True  # in flight from now on (also marks it visited)
            self.held -= 1
            self.inflight += 1
            stack.append((e, True))
            for d in e[2]:
                dst = states.get(d)
                w = dst.window if dst is not None else None
                if w is not None and w is not True:
                    stack.append((w, False))
        for e in order:
            fid = e[4]
            functions[fid] = self.functions[fid][0]
            self._unref(fid)
            tasks.append([e[0].key, e[1], list(e[2]), e[3], fid])

    def _unref(self, fid: str) -> None:
        f = self.functions.get(fid)
        if f is not None:
            f[1] -= 1
            if f[1] <= 0:
                del self.functions[fid]
