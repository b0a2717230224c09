"""What the scheduler will send, per peer, until the shell takes it: one message per peer."""

from __future__ import annotations

#: The list field of each op that :meth:`Outbox.batch` can merge.
LIST_FIELD = {"memory": "items", "erred": "items", "compute": "tasks", "free": "keys",
              "cancelled": "keys", "acquire": "items", "lost": "keys", "forget-functions": "keys",
              "give-back": "keys"}


class Outbox:
    """Ops queued per peer. Items of list-carrying ops to one peer merge into one op.

    Consecutive :meth:`batch` items of the same op to the same peer share one op; any other op
    sent to that peer in between closes the batch first, so the peer sees everything in the
    order it was queued. Ops for the peers in ``ignore`` (pseudo peers) are dropped.
    """

    __slots__ = ("_batched", "_ops", "ignore")

    def __init__(self, ignore: frozenset[bytes] = frozenset()):
        self.ignore = ignore
        self._ops: dict[bytes, list[dict]] = {}
        self._batched: dict[bytes, tuple[str, list]] = {}

    def send(self, peer: bytes, op: dict) -> None:
        if peer in self.ignore:
            return
        if peer in self._batched:
            self._close_batch(peer)
        box = self._ops.get(peer)
        if box is None:
            self._ops[peer] = [op]
        else:
            box.append(op)

    def batch(self, peer: bytes, op: str, item) -> None:
        """Queue one item of a list-carrying op (memory, erred, compute, free...)."""
        if peer in self.ignore:
            return
        b = self._batched.get(peer)
        if b is None or b[0] != op:
            if b is not None:
                self._close_batch(peer)
            self._batched[peer] = (op, [item])
        else:
            b[1].append(item)

    def _close_batch(self, peer: bytes) -> None:
        op, items = self._batched.pop(peer)
        message = {"op": op, LIST_FIELD[op]: items}
        box = self._ops.get(peer)
        if box is None:
            self._ops[peer] = [message]
        else:
            box.append(message)

    def flush(self) -> dict[bytes, list[dict]]:
        """The ops queued since the last flush, by peer; the outbox is emptied."""
        for peer in list(self._batched):
            self._close_batch(peer)
        out, self._ops = self._ops, {}
        return out


def encode_bounded(ops: list[dict], limit: int, encode) -> list[bytes]:
    """``ops`` packed by ``encode`` into frames of at most about ``limit`` bytes each, in
    order: a long list is cut between ops, a long list-carrying op between its items (one
    op or item larger than ``limit`` still goes whole). Costs a re-pack only past ``limit``."""
    frame = encode(ops)
    if len(frame) <= limit:
        return [frame]
    if len(ops) > 1:
        mid = len(ops) // 2
        return encode_bounded(ops[:mid], limit, encode) + encode_bounded(ops[mid:], limit, encode)
    op = ops[0]
    field = LIST_FIELD.get(op["op"])
    items = op.get(field) if field else None
    if items is not None and len(items) > 1:
        mid = len(items) // 2
        return (encode_bounded([{**op, field: items[:mid]}], limit, encode)
                + encode_bounded([{**op, field: items[mid:]}], limit, encode))
    return [frame]
