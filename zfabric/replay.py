"""What a client told its scheduler that a new scheduler incarnation must hear again.

When the scheduler dies and a new one starts at the same address (docs/faults.md, "The
scheduler restarts"), the client registers again and sends the new one what it needs to
carry on: every task it still waits for, the small values it holds, the keys it holds
futures for, and the Variables, Events and datasets it set.

:class:`Replay` records it from the ops as they leave (:meth:`Replay.sent`, called by the
session for each message) and forgets it as it stops mattering, so a healthy client pays one
dict store per task sent and one removal per task finished or released:

- the ``submit`` item of each task (its pickled call, kept as the bytes already made) and the
  pickles of their functions, until the client's future finishes with a small (inline) value
  (then that value is sent again instead), fails, is cancelled, or is released. A task this
  client holds no future for (an inner task of a dask graph) is kept while a recorded task
  depends on it, so that the graph can be rebuilt and lost results recomputed;
- the ``scatter`` item of each value it placed, under the same rules;
- the last ``var-set``, ``ds-publish`` and ``event-set``/``event-clear`` per name.

:meth:`Replay.ops` builds the ops to send again, in the order first sent (dependencies first).
Pure bookkeeping, no I/O, called under the client's lock on its loop thread.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Replay"]

_COORD_KEPT = {"var-set": "var", "var-delete": "var", "ds-publish": "ds",
               "ds-unpublish": "ds", "event-set": "event", "event-clear": "event"}


class Replay:
    """A client's record of what a new scheduler incarnation must hear (see module)."""

    __slots__ = ("coord", "functions", "items", "pinned", "users")

    def __init__(self) -> None:
        #: key -> ("t", submit item) or ("s", scatter item), in the order first sent
        self.items: dict[str, tuple[str, list]] = {}
        #: keys this client holds futures for whose item is kept
        self.pinned: set[str] = set()
        #: key -> recorded tasks that depend on it (an unpinned key stays while any does)
        self.users: dict[str, int] = {}
        self.functions: dict[str, list] = {}  # function id -> [pickle, recorded tasks]
        self.coord: dict[tuple[str, str], dict] = {}  # (kind, name) -> the last op

    def clear(self) -> None:
        """Forget everything (the futures failed: nothing will be sent again)."""
        self.items.clear()
        self.pinned.clear()
        self.users.clear()
        self.functions.clear()
        self.coord.clear()

    # ------------------------------------------------------------------ recording

    def sent(self, ops: Iterable, states: dict) -> None:
        """Ops that leave for the scheduler; ``states``: the client's key states."""
        for op in ops:
            name = op["op"]
            if name == "submit":
                self._tasks(op, states)
            elif name == "release":
                for key in op["keys"]:
                    self.unpin(key)
            elif name == "scatter":
                items = self.items
                for item in op["items"]:
                    key = item[0]
                    if key in items:
                        self._drop(key)
                    items[key] = ("s", item)
                    if key in states:
                        self.pinned.add(key)
            elif name == "coord":
                kind = op["kind"]
                group = _COORD_KEPT.get(kind)
                if group is not None:
                    if kind in ("var-delete", "ds-unpublish"):
                        self.coord.pop((group, op["name"]), None)
                    else:
                        self.coord[group, op["name"]] = op

    def _tasks(self, op: dict, states: dict) -> None:
        items = self.items
        users = self.users
        pinned = self.pinned
        functions = self.functions
        sent_functions = op.get("functions") or {}
        for t in op["tasks"]:
            key = t[0]
            if key in items:
                self._drop(key)
            items[key] = ("t", t)
            if key in states:
                pinned.add(key)
            fid = t[4] if len(t) > 4 else None
            if fid is not None:
                f = functions.get(fid)
                if f is None:
                    functions[fid] = [sent_functions.get(fid), 1]
                else:
                    f[1] += 1
            for d in t[2]:
                if d in items:
                    users[d] = users.get(d, 0) + 1

    def unpin(self, key: str) -> None:
        """This client's future for ``key`` finished with its value here, failed, was
        cancelled or released: its item goes, unless a recorded task depends on it."""
        if key in self.pinned:
            self.pinned.discard(key)
            if not self.users.get(key):
                self._drop(key)

    def _drop(self, key: str) -> None:
        items, users, pinned = self.items, self.users, self.pinned
        stack = [key]
        while stack:
            k = stack.pop()
            entry = items.pop(k, None)
            if entry is None:
                continue
            pinned.discard(k)
            kind, item = entry
            if kind != "t":
                continue
            fid = item[4] if len(item) > 4 else None
            if fid is not None:
                f = self.functions.get(fid)
                if f is not None:
                    f[1] -= 1
                    if f[1] <= 0:
                        del self.functions[fid]
            for d in item[2]:
                n = users.get(d)
                if n is None:
                    continue
                if n > 1:
                    users[d] = n - 1
                    continue
                del users[d]
                if d not in pinned:
                    stack.append(d)

    # ------------------------------------------------------------------ sending again

    def ops(self, states: dict, queued: set[str], batch: int, max_bytes: int) -> list[dict]:
        """The ops that tell a new scheduler incarnation what this client still needs, in
        order: values and tasks as first sent (a finished future's small value instead of
        its task), wants for the other keys it holds futures for (``queued``: keys whose
        submit has not left yet), its Variables, Events and datasets, and a release of the
        inner keys (the scheduler keeps them while tasks need them)."""
        out: list[dict] = []
        tasks: list = []
        functions: dict = {}
        size = 0

        def flush_tasks() -> None:
            nonlocal tasks, functions, size
            if tasks:
                out.append({"op": "submit", "tasks": tasks, "functions": functions})
                tasks, functions, size = [], {}, 0

        scatter: list = []

        def flush_scatter() -> None:
            nonlocal scatter
            if scatter:
                out.append({"op": "scatter", "items": scatter})
                scatter = []

        inner = []
        for key, (kind, item) in self.items.items():
            st = states.get(key)
            if st is None:
                inner.append(key)
            if st is not None and st.status == "finished" and st.value is not None:
                kind, item = "s", [key, st.value, st.nbytes, []]
            if kind == "s":
                flush_tasks()
                scatter.append(item)
                continue
            flush_scatter()
            fid = item[4] if len(item) > 4 else None
            if fid is not None and fid not in functions:
                f = self.functions.get(fid)
                if f is None or f[0] is None:
                    continue  # (never: its function was sent with it)
                functions[fid] = f[0]
                size += len(f[0])
            tasks.append(item)
            size += len(item[1])
            if len(tasks) >= batch or size >= max_bytes:
                flush_tasks()
        flush_tasks()
        items = self.items
        wants = []
        for key, st in states.items():
            if key in items or key in queued or st.status in ("error", "cancelled"):
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
