"""What a client told its scheduler that a new scheduler incarnation must hear again.

When the scheduler dies and a new one starts at the same address (docs/faults.md, "The
scheduler restarts"), the client registers again and sends the new one what it needs to
carry on: every task it still waits for, the small values it holds, the keys it holds
futures for, and the Variables, Events and datasets it set.

:class:`Replay` keeps, per message sent, its ``submit`` and ``scatter`` ops as they left (the
pickled calls already made: nothing is copied), and the last ``var-set``, ``ds-publish`` and
``event-set``/``event-clear`` per name. A healthy client pays one list append per message for
it; nothing is done per task or per result. Once the ops kept hold three times as many tasks as
after the last sweep, :meth:`Replay.sweep` drops the messages nothing needs any more (newest
first: a message is needed while it carries a task or value this client waits for, or holds
a future for whose value is on a worker, or one that a needed message depends on), so the
cost stays a few dict lookups per task, paid once or twice, and the memory bounded by what
the client holds.

:meth:`Replay.ops` builds the ops to send again, in the order first sent (dependencies
first): a finished future's small value instead of its task, the tasks of the graphs it
waits for (inner tasks too, so that lost results can be recomputed), wants for the other keys
it holds futures for. Pure bookkeeping, no I/O, called on the client's loop thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["Replay"]

_COORD_KEPT = {"var-set": "var", "var-delete": "var", "ds-publish": "ds",
               "ds-unpublish": "ds", "event-set": "event", "event-clear": "event"}

#: Tasks and values kept before the first sweep.
SWEEP_FIRST = 4096


def _needs_sending(st) -> bool:
    """Whether a new scheduler must compute (or find on a worker) a held key's value."""
    status = st.status
    return status == "pending" or (status == "finished" and st.value is None)


class Replay:
    """A client's record of what a new scheduler incarnation must hear (see module)."""

    __slots__ = ("coord", "groups", "limit", "recorded")

    def __init__(self) -> None:
        #: the submit and scatter ops of each message sent, oldest first
        self.groups: deque[list[dict]] = deque()
        self.recorded = 0  # tasks and values in ``groups``
        self.limit = SWEEP_FIRST  # sweep when ``recorded`` passes this
        self.coord: dict[tuple[str, str], dict] = {}  # (kind, name) -> the last op

    def clear(self) -> None:
        """Forget everything (the futures failed: nothing will be sent again)."""
        self.groups.clear()
        self.recorded = 0
        self.limit = SWEEP_FIRST
        self.coord.clear()

    # ------------------------------------------------------------------ recording

    def sent(self, ops: Iterable, states: dict) -> None:
        """Ops that leave for the scheduler; ``states``: the client's key states."""
        kept = None
        n = 0
        for op in ops:
            name = op["op"]
            if name == "submit":
                n += len(op["tasks"])
            elif name == "scatter":
                n += len(op["items"])
            elif name == "coord":
                group = _COORD_KEPT.get(op["kind"])
                if group is not None:
                    if op["kind"] in ("var-delete", "ds-unpublish"):
                        self.coord.pop((group, op["name"]), None)
                    else:
                        self.coord[group, op["name"]] = op
                continue
            else:
                continue
            if kept is None:
                kept = [op]
            else:
                kept.append(op)
        if kept is not None:
            self.groups.append(kept)
            self.recorded += n
            if self.recorded > self.limit:
                self.sweep(states)

    def sweep(self, states: dict) -> set[str]:
        """Drop the messages nothing needs any more (see the module docstring); returns the
        keys of inner tasks the kept ones depend on."""
        needed: set[str] = set()
        keep = []
        n = 0
        get = states.get
        for group in reversed(self.groups):
            live = False
            for op in group:
                for item in op["tasks"] if op["op"] == "submit" else op["items"]:
                    key = item[0]
                    if key in needed:
                        live = True
                        break
                    st = get(key)
                    if st is not None and (st.status == "pending" or (
                            st.status == "finished" and st.value is None)):
                        live = True
                        break
                if live:
                    break
            if not live:
                continue
            keep.append(group)
            for op in group:
                if op["op"] == "submit":
                    tasks = op["tasks"]
                    n += len(tasks)
                    for t in tasks:
                        needed.update(t[2])
                else:
                    n += len(op["items"])
        keep.reverse()
        self.groups = deque(keep)
        self.recorded = n
        self.limit = max(SWEEP_FIRST, 3 * n)
        return needed

    # ------------------------------------------------------------------ sending again

    def ops(self, states: dict, queued: set[str], batch: int, max_bytes: int) -> list[dict]:
        """The ops that tell a new scheduler incarnation what this client still needs, in
        order (see the module docstring); ``queued``: keys whose submit has not left yet."""
        needed = self.sweep(states)
        out: list[dict] = []
        tasks: list = []
        functions: dict = {}
        scatter: list = []
        size = 0

        def flush_tasks() -> None:
            nonlocal tasks, functions, size
            if tasks:
                out.append({"op": "submit", "tasks": tasks, "functions": functions})
                tasks, functions, size = [], {}, 0

        def flush_scatter() -> None:
            nonlocal scatter
            if scatter:
                out.append({"op": "scatter", "items": scatter})
                scatter = []

        done: set[str] = set()
        inner = []
        for group in self.groups:
            for op in group:
                submit = op["op"] == "submit"
                for item in op["tasks"] if submit else op["items"]:
                    key = item[0]
                    if key in done or key in queued:
                        continue
                    st = states.get(key)
                    if st is None:
                        if key not in needed:
                            continue  # released, and nothing kept depends on it
                        inner.append(key)
                    elif st.status == "finished" and st.value is not None:
                        done.add(key)
                        flush_tasks()
                        scatter.append([key, st.value, st.nbytes, []])
                        continue
                    elif not _needs_sending(st):
                        continue  # failed or cancelled
                    done.add(key)
                    if not submit:
                        flush_tasks()
                        scatter.append(item)
                        continue
                    flush_scatter()
                    fid = item[4] if len(item) > 4 else None
                    if fid is not None and fid not in functions:
                        functions[fid] = op["functions"][fid]
                        size += len(functions[fid])
                    tasks.append(item)
                    size += len(item[1])
                    if len(tasks) >= batch or size >= max_bytes:
                        flush_tasks()
        flush_tasks()
        wants = []
        for key, st in states.items():
            if key in done or key in queued or st.status in ("error", "cancelled"):
                continue
            if st.window is not None and st.window is not True:
                continue  # held in the submit window: it leaves later
            if st.status == "finished" and st.value is not None:
                scatter.append([key, st.value, st.nbytes, []])
            else:
                wants.append(key)
        flush_scatter()
        if wants:
            out.append({"op": "want", "keys": wants})
        for op in self.coord.values():
            again = {**op, "id": 0}
            if again["kind"] == "ds-publish":
                again["override"] = True
            out.append(again)
        if inner:
            out.append({"op": "release", "keys": inner})
        return out
