"""``Client.set_metadata`` / ``get_metadata``: a tree of small values kept on the cluster.

dask.distributed keeps this tree in its scheduler; zfabric's scheduler holds no user values
apart from its coordination records, so the tree is one :class:`~zfabric.coordination.Variable`
(``zfabric-metadata``) and a change is a read-modify-write under the
:class:`~zfabric.coordination.Lock` of the same name: every client sees the same tree.
A key is a string, or a list of strings naming a path in nested dicts.
"""

from __future__ import annotations

from typing import Any

from .coordination import Lock, Variable, call

__all__ = ["Metadata"]

#: The name of the Variable (and Lock) that hold the metadata tree.
NAME = "zfabric-metadata"
_NO_DEFAULT = object()


def _path(keys) -> list:
    if isinstance(keys, str | int | float | bytes | tuple):
        return [keys]
    path = list(keys)
    if not path:
        raise ValueError("a metadata key needs at least one part")
    return path


class Metadata:
    """The Client's metadata methods (see the module docstring), for ``client``."""

    def __init__(self, client: Any):
        self.client = client

    def set_metadata(self, key, value):
        """Set ``value`` at ``key`` (a string, or a list of strings: a path of nested dicts,
        made as needed)."""
        return self.client.sync(self._set, _path(key), value)

    def get_metadata(self, keys, default=_NO_DEFAULT):
        """The value at ``keys`` (a string or a path); ``default`` if absent, else
        ``KeyError``."""
        return self.client.sync(self._get, _path(keys), default)

    async def _tree(self) -> dict:
        try:
            return await Variable(NAME, client=self.client)._get(0)
        except TimeoutError:
            return {}

    async def _set(self, path: list, value) -> None:
        lock = Lock(NAME, client=self.client)
        await lock._acquire(None)
        try:
            tree = await self._tree()
            node = tree
            for part in path[:-1]:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            node[path[-1]] = value
            await Variable(NAME, client=self.client)._set(tree)
        finally:
            await call(self.client, "sem-release", NAME, lease=lock._leases.pop(0))

    async def _get(self, path: list, default):
        node: Any = await self._tree()
        try:
            for part in path:
                node = node[part]
        except (KeyError, TypeError):
            if default is _NO_DEFAULT:
                raise KeyError(path[0] if len(path) == 1 else path) from None
            return default
        return node
