"""Published datasets: named values (Futures, collections, anything picklable) that any client
of the scheduler can read, as with dask.distributed's ``publish_dataset``.

:class:`Datasets` is the part of a :class:`~zfabric.client.Client` that holds these methods.
The scheduler keeps each dataset as an item of :mod:`zfabric.scheduler.shared_state`: the
Futures inside it (anywhere in it, a persisted collection's included) stay alive until it is
unpublished; a value over the inline limit is scattered to a worker first.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from .coordination import call, decode, encode

_NO_DEFAULT = object()


class Datasets:
    """The Client's dataset methods (see the module docstring), for ``client``."""

    def __init__(self, client: Any):
        self.client = client
        self.sync = client.sync

    def publish_dataset(self, *args, name=None, override: bool = False, **kwargs):
        """Publish named data: ``publish_dataset(x, name="x")`` or ``publish_dataset(x=x)``.

        KeyError if a name is taken, unless ``override=True``.
        """
        if name is not None:
            if len(args) != 1:
                raise ValueError("with name=..., give one value:"
                                 " publish_dataset(value, name='name')")
            kwargs = {name: args[0], **kwargs}
        elif args:
            raise ValueError("without name=..., name each value: publish_dataset(name=value)")
        for n in kwargs:
            if not isinstance(n, str):
                raise TypeError(f"a dataset name must be a string, got {type(n).__name__}")
        return self.sync(self._publish, kwargs, bool(override))

    async def _publish(self, data: dict, override: bool):
        for n, value in data.items():
            item, keep = await encode(self.client, value)
            await call(self.client, "ds-publish", n, item=item, override=override)
            del keep

    def get_dataset(self, name, default=_NO_DEFAULT, **kwargs):
        """The dataset called ``name`` (its Futures bound to this client); KeyError if there is
        none, unless ``default`` is given."""
        if kwargs:
            raise TypeError(f"get_dataset got unexpected arguments: {', '.join(kwargs)}")
        return self.sync(self._get_dataset, name, default)

    async def _get_dataset(self, name, default):
        try:
            item = await call(self.client, "ds-get", str(name))
        except KeyError:
            if default is _NO_DEFAULT:
                raise
            return default
        return await decode(self.client, item)

    def list_datasets(self, **kwargs):
        """The names of the published datasets."""
        if kwargs:
            raise TypeError(f"list_datasets got unexpected arguments: {', '.join(kwargs)}")
        return self.sync(call, self.client, "ds-list", "")

    def unpublish_dataset(self, name, **kwargs):
        """Remove a dataset (its Futures are released unless someone else holds them)."""
        if kwargs:
            raise TypeError(f"unpublish_dataset got unexpected arguments: {', '.join(kwargs)}")
        return self.sync(call, self.client, "ds-unpublish", str(name))


class DatasetsMapping(MutableMapping):
    """``client.datasets``: the published datasets as a dict-like view."""

    def __init__(self, client):
        if client.asynchronous:
            raise TypeError("client.datasets needs a blocking client; with an asynchronous"
                            " one use await client.get_dataset(...) and its siblings")
        self._client = client

    def __getitem__(self, name):
        return self._client.get_dataset(name)

    def __setitem__(self, name, value):
        self._client.publish_dataset(value, name=name, override=True)

    def __delitem__(self, name):
        if name not in self:
            raise KeyError(name)
        self._client.unpublish_dataset(name)

    def __iter__(self):
        return iter(self._client.list_datasets())

    def __len__(self):
        return len(self._client.list_datasets())

    def __contains__(self, name):
        return name in self._client.list_datasets()
