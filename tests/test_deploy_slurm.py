"""SLURMCluster against a real SLURM (Debian's slurm-wlm and munge), started once per run.

The lab (:mod:`slurm_fixture`) is a controller host ``ctl`` and two single-CPU compute nodes,
each in a network namespace of its own; the client scripts run on ``ctl``, so the jobs'
workers reach the scheduler only over the namespace network. Root only; skipped otherwise
(failed with ``CI=true``).
"""

from __future__ import annotations

import pytest
import slurm_fixture


@pytest.fixture(scope="session")
def lab():
    lab = slurm_fixture.lab_or_skip(nodes=2)
    try:
        yield lab
    finally:
        lab.close()


def test_lab_runs_a_batch_job_on_a_node(lab):
    """The lab itself: ``sbatch --wrap hostname`` runs on a node, which names itself."""
    out = lab.dir / "hostname-%j.out"
    job = lab.run(["sbatch", "--parsable", "-o", str(out), "--wrap", "hostname"]).stdout.strip()
    lab.wait_queue_empty(30)
    text = (lab.dir / f"hostname-{job}.out").read_text().strip()
    assert text in lab.node_names
