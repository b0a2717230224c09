"""``zfabric.span``: name a part of a computation, as dask.distributed's ``span``.

``with span("load", "clean") as span_id:`` tags the dask tasks made inside the block with
dask's ``span`` annotation (nested spans add their tags to the outer ones'), so that tools
reading annotations can group them. zfabric's scheduler does not aggregate metrics per span
(dask.distributed's does): the annotation travels with the tasks and the id is returned.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import uuid
from collections.abc import Iterator

__all__ = ["span"]

_current: contextvars.ContextVar[tuple[tuple[str, ...], tuple[str, ...]]] = \
    contextvars.ContextVar("zfabric_span", default=((), ()))


@contextlib.contextmanager
def span(*tags: str) -> Iterator[str]:
    """Tag what is made in the block with ``tags``; yields the span's id."""
    if not tags or not all(isinstance(t, str) for t in tags):
        raise TypeError(f"span needs one or more string tags, got {tags!r}")
    names, ids = _current.get()
    span_id = str(uuid.uuid4())
    names, ids = names + tags, (*ids, span_id)
    token = _current.set((names, ids))
    try:
        if importlib.util.find_spec("dask") is None:
            yield span_id
            return
        import dask  # an optional dependency: only where it is installed

        with dask.annotate(span={"name": names, "ids": ids}):
            yield span_id
    finally:
        _current.reset(token)


def current_span() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(tags, ids)`` of the innermost span block (empty outside any)."""
    return _current.get()
