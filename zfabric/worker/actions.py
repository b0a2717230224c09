"""The actions :class:`~zfabric.worker.state.WorkerCore` returns: what its shell still has to do.

Each action is a tuple ``(NAME, fields...)`` whose first item is one of these names; the shell
(:class:`~zfabric.worker.core.WorkerLoop`) carries them out in the order given. They are
plain tuples, not objects, because one or two of them go by for every task.
"""

from __future__ import annotations

#: (EXECUTE, key, payload, options, function id, borrowed dependency keys or None)
EXECUTE = "execute"
#: (STORE_INLINE, key, pickled value): a dependency that came with its task
STORE_INLINE = "store-inline"
#: (STORE, key, header, buffers, raw): a fetched or placed value to keep
STORE = "store"
#: (KEEP, outcome): a task's result to keep (value and its pickle)
KEEP = "keep"
#: (DROP, key): forget the stored value (a borrowed copy nobody needs, a freed key)
DROP = "drop"
#: (FETCH, fetch id, peer address, keys, None or [(key, sizes)] to lease segments for)
#: or, a first request with sizes guessed: (FETCH, id, peer, keys, None, [(key, sizes)])
FETCH = "fetch"
#: (END_FETCH, fetch id): the fetch is over; its shared-memory leases go
END_FETCH = "end-fetch"
#: (CANCEL, key): the executor must not start ``key`` (it may be queued)
CANCEL = "cancel"
#: (UNCANCEL, key): ``key`` runs again; the executor must not skip it
UNCANCEL = "uncancel"
#: (TRANSITION, key, start, finish): for plugins that hear transitions (``hear_transitions``)
TRANSITION = "transition"
#: (REPLACE_THREAD, thread id): abandon a thread stuck past its task's task_timeout
REPLACE_THREAD = "replace-thread"
#: (LOAD_FUNCTIONS, items) and (FORGET_FUNCTIONS, keys): the scheduler's function cache
LOAD_FUNCTIONS = "functions"
FORGET_FUNCTIONS = "forget-functions"
#: (ACQUIRE_VALUES, [(key, pickled value)], done keys, failed keys): load, then acquire_loaded()
ACQUIRE_VALUES = "acquire-values"
#: (WORKER_KEYS, keys): public keys of the cluster's workers (security)
WORKER_KEYS = "worker-keys"
#: (RUN, request id, payload) and (PLUGIN, op): calls the scheduler relays
RUN = "run"
PLUGIN = "plugin"
#: (WELCOMED,): the first welcome: the worker is ready (preloads run, start() returns)
WELCOMED = "welcomed"
#: (REFUSED, message): the scheduler refused this worker for good
REFUSED = "refused"
#: (FORGET,): a new scheduler: forget every value, every queued message
FORGET = "forget"
#: (REJOIN, keys held, keys running, the old epoch): a new scheduler incarnation: keep the
#: values, drop what was meant for the old one, queue a ``holding`` report (with sizes)
REJOIN = "rejoin"
#: (STOP, reason, exit code or None): close the worker
STOP = "stop"
