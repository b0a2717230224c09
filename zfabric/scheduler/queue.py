"""Queued tasks, most urgent first, cheaply in the common case."""

from __future__ import annotations

import heapq
from collections import deque


class ReadyQueue:
    """Tasks that are ready but have no worker slot yet, by ``TaskState.priority``.

    Most tasks arrive in priority order (default priority, submission order): those go to a
    FIFO, which costs O(1) each way. A task that arrives out of order (a user priority, a task
    put back after its worker died) goes to a heap. ``pop`` takes whichever head is smaller.
    Entries are not removed when a task leaves the queued state; the caller skips them.
    """

    __slots__ = ("fifo", "heap")

    def __init__(self):
        self.fifo: deque = deque()
        self.heap: list = []

    def __bool__(self) -> bool:
        return bool(self.fifo) or bool(self.heap)

    def __len__(self) -> int:
        return len(self.fifo) + len(self.heap)

    def push(self, ts) -> None:
        fifo = self.fifo
        if not fifo or fifo[-1].priority < ts.priority:
            fifo.append(ts)
        else:
            heapq.heappush(self.heap, (ts.priority, ts))

    def pop(self):
        fifo, heap = self.fifo, self.heap
        if heap and (not fifo or heap[0][0] < fifo[0].priority):
            return heapq.heappop(heap)[1]
        return fifo.popleft()
