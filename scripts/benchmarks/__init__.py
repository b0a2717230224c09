"""The rows of ``scripts/bench.py``, one module per family, and the loop that runs them.

* ``common``: constants, errors, :class:`Row`, :class:`Measurement`, number formatting.
* ``funcs``: the task functions every row sends (shipped to workers by value).
* ``impls``: how to reach each implementation (zfabric, zfabric with CURVE, dask.distributed)
  and the sizes of every row for each.
* ``cluster``: the processes of a benchmark cluster (scheduler + 2 workers + async client).
* ``runner``: the one run loop (a child process per implementation and row, repetitions,
  medians, the side-by-side table and the JSON report).
* Families of rows: ``roundtrip``, ``actors``, ``tasks``, ``data`` (data movement),
  ``startup`` (LocalCluster), ``memory`` (scheduler bytes per task), ``dask_collections``,
  ``spill``; ``rows`` lists them in the table's order.
* ``probe`` and ``dashboard``: the dashboard-cost runs (``--dashboard-cost``).
"""
