"""SLURMCluster against a real SLURM (Debian's slurm-wlm and munge), started once per run.

The lab (:mod:`slurm_fixture`) is a controller host ``ctl`` and two single-CPU compute nodes,
each in a network namespace of its own. Each test's client is a script run on ``ctl`` (the
cluster's scheduler lives in it), so the jobs' workers reach the scheduler only over the
namespace network: a 127.0.0.1 address would fail there. The script prints one JSON report as
its last line. Root only; skipped otherwise (a missing SLURM program fails with ``CI=true``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import slurm_fixture

from zfabric.deploy.jobqueue import format_walltime, parse_walltime
from zfabric.deploy.pbs import PBSCluster

#: Bounded wait for one client script.
SCRIPT_TIMEOUT_S = 150.0

pytestmark = pytest.mark.timeout(SCRIPT_TIMEOUT_S + 30)

# Every script starts with this: a report printed as JSON at the end, warnings collected.
PRELUDE = r'''
import json, logging, os, socket, sys, time
from zfabric import Client
from zfabric.deploy.jobqueue import JobFailedError, JobSubmissionError
from zfabric.deploy.slurm import SLURMCluster

LOGDIR = os.environ["ZF_TEST_LOGDIR"]
report = {}
warnings = []

class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())

logging.getLogger("zfabric.cluster").addHandler(Collect())
logging.basicConfig(level=logging.INFO)


def done():
    report["warnings"] = warnings
    print("REPORT " + json.dumps(report), flush=True)


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)
'''


@pytest.fixture(scope="session")
def lab():
    lab = slurm_fixture.lab_or_skip(nodes=2)
    try:
        yield lab
    finally:
        lab.close()


def _env(lab, **settings) -> dict[str, str]:
    env = lab.env
    env["ZF_TEST_LOGDIR"] = str(lab.dir)
    env["ZFABRIC_JOB_STATUS_INTERVAL_S"] = "0.5"
    env.update({f"ZFABRIC_{k}": str(v) for k, v in settings.items()})
    return env


def start_script(lab, name: str, body: str, **settings) -> subprocess.Popen:
    path = lab.dir / f"{name}.py"
    path.write_text(PRELUDE + textwrap.dedent(body))
    return lab.popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, cwd=lab.dir,
                     env=_env(lab, **settings))


def run_script(lab, name: str, body: str, **settings) -> dict:
    """Run ``body`` (after PRELUDE) on ``ctl``; its report. Fails with its output."""
    p = start_script(lab, name, body, **settings)
    try:
        out, _ = p.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        pytest.fail(f"{name} did not end within {SCRIPT_TIMEOUT_S:g} s:\n{out[-6000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("REPORT ")]
    assert p.returncode == 0 and lines, f"{name} exited {p.returncode}:\n{out[-8000:]}\n" \
                                        f"{lab.logs()}"
    return json.loads(lines[-1][len("REPORT "):])


def job_log(lab, job_id: str) -> str:
    (path,) = lab.dir.glob(f"zfabric-*-{job_id}.out")
    return path.read_text()


def host(address: str) -> str:
    return address.split("://")[-1].rpartition(":")[0]


# ---------------------------------------------------------------------- the lab itself


def test_lab_runs_a_batch_job_on_a_node(lab):
    """``sbatch --wrap hostname`` runs on a node, which names itself."""
    out = lab.dir / "hostname-%j.out"
    job = lab.run(["sbatch", "--parsable", "-o", str(out), "--wrap", "hostname"]).stdout.strip()
    assert lab.wait_queue_empty(30) == []
    text = (lab.dir / f"hostname-{job}.out").read_text().strip()
    assert text in lab.node_names


# ---------------------------------------------------------------------- SLURMCluster


def test_scale_two_jobs_runs_a_computation_and_close_cancels(lab):
    # Given a cluster of one-core jobs and scale(jobs=2)
    r = run_script(lab, "scale", r'''
        with SLURMCluster(cores=1, memory="1GB", walltime="00:05:00", log_directory=LOGDIR,
                          death_timeout=10) as cluster:
            report["script"] = cluster.job_script()
            report["address"] = cluster.scheduler_address
            cluster.scale(jobs=2)
            cluster.wait_for_workers(2, timeout=60)
            with Client(cluster) as client:
                report["workers"] = sorted(client.scheduler_info()["workers"])
                report["results"] = client.gather(
                    client.map(lambda i: [i * i, socket.gethostname()], range(20)))
            wait_until(lambda: set(cluster.jobs.values()) == {"RUNNING"}, 10, "RUNNING")
            report["jobs"] = cluster.jobs
            report["job_ids"] = cluster.job_ids
        report["squeue_right_after_close"] = os.popen("squeue -h -o %i").read().split()
        done()
    ''')
    # Then the workers ran on both nodes and were given the scheduler's namespace address
    assert host(r["address"]) == lab.ctl_ip
    assert sorted(host(w) for w in r["workers"]) == sorted(lab.node_ips)
    assert [v for v, _ in r["results"]] == [i * i for i in range(20)]
    assert {h for _, h in r["results"]} == set(lab.node_names)
    assert r["jobs"] == {"0": "RUNNING", "1": "RUNNING"}
    # and the job script carries dask-jobqueue's directives and the walltime for the workers
    script = r["script"]
    for line in ("#SBATCH -J zfabric-", "#SBATCH -n 1", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --mem=954M", "#SBATCH -t 00:05:00", "--walltime 300",
                 "--death-timeout 10"):
        assert line in script
    # And close() cancelled the jobs: squeue lists none once SLURM has cleaned up
    assert set(r["squeue_right_after_close"]) <= set(r["job_ids"].values())
    assert lab.wait_queue_empty(20) == []
    for job_id in r["job_ids"].values():
        assert "CANCELLED" in job_log(lab, job_id)


def test_adapt_grows_then_shrinks_to_zero(lab):
    r = run_script(lab, "adapt", r'''
        with SLURMCluster(cores=1, walltime="00:05:00", log_directory=LOGDIR,
                          death_timeout=10) as cluster:
            adaptive = cluster.adapt(minimum_jobs=0, maximum_jobs=2, interval="0.5s",
                                     wait_count=2, target_duration="1s")
            with Client(cluster) as client:
                futures = client.map(lambda i: time.sleep(0.5) or i, range(24))
                seen = []
                while not all(f.done() for f in futures):
                    seen.append(len(cluster.jobs))
                    time.sleep(0.2)
                report["most_jobs"] = max(seen)
                report["results"] = client.gather(futures)
                del futures
            wait_until(lambda: not cluster.jobs, 40, "the jobs to be retired")
            report["log"] = [what for _, what, _, _ in adaptive.log]
        done()
    ''')
    assert r["results"] == list(range(24))
    assert r["most_jobs"] == 2
    assert r["log"][0] == "up" and r["log"][-1] == "down"
    assert lab.wait_queue_empty(20) == []


def test_a_bad_partition_raises_sbatchs_message(lab):
    r = run_script(lab, "badpartition", r'''
        with SLURMCluster(cores=1, queue="nosuch", log_directory=LOGDIR) as cluster:
            try:
                cluster.scale(jobs=1)
            except JobSubmissionError as exc:
                report["scale"] = str(exc)
            cluster.wait_for_workers(0, timeout=5)  # scale() raised: not once more here
            cluster.adapt(minimum_jobs=1, maximum_jobs=1, interval="0.5s")
            try:
                cluster.wait_for_workers(1, timeout=30)
            except JobSubmissionError as exc:
                report["wait"] = str(exc)

        async def main():
            async with SLURMCluster(cores=1, queue="nosuch", log_directory=LOGDIR,
                                    asynchronous=True) as cluster:
                try:
                    await cluster.scale(jobs=1)
                except JobSubmissionError as exc:
                    report["async"] = str(exc)

        import asyncio
        asyncio.run(main())
        done()
    ''')
    for where in ("scale", "wait", "async"):
        assert "sbatch" in r[where] and "invalid partition specified: nosuch" in r[where]


def test_a_pending_job_is_visible_and_reported_once(lab):
    # Given a job sent to a partition that is DOWN, and PENDING_REPORT_S of 2 s
    r = run_script(lab, "pending", r'''
        with SLURMCluster(cores=1, queue="down", log_directory=LOGDIR) as cluster:
            cluster.scale(jobs=1)
            wait_until(lambda: any("PENDING for" in w for w in warnings), 20, "the report")
            report["jobs"] = cluster.jobs
            time.sleep(3)  # a few more checks: no second report
            with Client(cluster) as client:
                report["events"] = [m for _, m in client.get_events("jobqueue")]
            report["job_ids"] = cluster.job_ids
        done()
    ''', PENDING_REPORT_S=2)
    assert r["jobs"] == {"0": "PENDING"}
    reports = [w for w in r["warnings"] if "PENDING for" in w]
    assert len(reports) == 1 and "PartitionDown" in reports[0]
    assert [(e["action"], e["reason"]) for e in r["events"]] == [("pending", "PartitionDown")]
    assert lab.wait_queue_empty(20) == []


def test_workers_retire_before_the_walltime_and_no_result_is_lost(lab):
    # Given jobs of SLURM's shortest walltime (1 minute) whose workers retire after 30 s,
    # adapt keeping one job (a replacement submitted 15 s before a retirement), and a chain
    # of 45 one-second tasks whose (large) results are all kept
    r = run_script(lab, "lifetime", r'''
        RUNS = os.path.join(LOGDIR, "runs")
        os.makedirs(RUNS, exist_ok=True)

        def step(prev, i, runs=RUNS):
            import os, socket, time, uuid
            with open(os.path.join(runs, f"{i}-{uuid.uuid4().hex}"), "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()} {time.time():.3f}")
            time.sleep(1)
            return bytes([i % 256]) * 200_000

        with SLURMCluster(cores=1, walltime="00:01:00", lifetime_lead=30,
                          log_directory=LOGDIR, death_timeout=10) as cluster:
            cluster.adapt(minimum_jobs=1, maximum_jobs=2, interval="0.5s")
            with Client(cluster) as client:
                futures = [client.submit(step, None, 0)]
                for i in range(1, 45):
                    futures.append(client.submit(step, futures[-1], i))
                t0 = time.monotonic()
                ended = {}
                while not futures[-1].done():
                    for name, state in cluster.jobs.items():
                        ended.setdefault(name, None)
                    time.sleep(0.5)
                results = client.gather(futures)
                report["ok"] = [r == bytes([i % 256]) * 200_000 for i, r in enumerate(results)]
                report["held_by"] = sorted({w for ws in client.who_has(futures).values()
                                            for w in ws})
            report["job_ids"] = cluster.job_ids
            report["names_seen"] = sorted(ended)
        runs = [[] for _ in range(45)]
        for f in os.listdir(RUNS):
            with open(os.path.join(RUNS, f)) as fh:
                node, _, started = fh.read().split()
            runs[int(f.split("-")[0])].append([node, float(started)])
        report["runs"] = [sorted(r, key=lambda x: x[1]) for r in runs]
        done()
    ''', JOB_REPLACE_AHEAD_S=15)
    # Then every result is right and no result was lost and recomputed: a task ran once, or
    # twice with both runs starting within a task's duration (1 s) of each other. That second
    # form is a race of retire_workers, not a lost result: the scheduler takes back a task
    # it gave the retiring worker and has not heard it start, but the worker had just
    # started it. A result lost with a worker would run again only after its first run ended.
    assert all(r["ok"]) and len(r["ok"]) == 45
    assert all(runs for runs in r["runs"]), r["runs"]
    twice = [runs for runs in r["runs"] if len(runs) > 1]
    assert len(twice) <= 2, twice
    for runs in twice:
        assert len(runs) == 2 and runs[1][1] - runs[0][1] < 1.0, runs
    # and the first job's workers retired by themselves before its walltime, its data moved
    assert "0" in r["names_seen"] and len(r["names_seen"]) >= 2
    first = sorted(p.name for p in lab.dir.glob("zfabric-0-*.out"))[-1]
    log = (lab.dir / first).read_text()
    assert "workers retired; their data moved to other workers" in log, log
    assert "DUE TO TIME LIMIT" not in log
    assert lab.wait_queue_empty(20) == []


def test_a_killed_client_leaves_no_job_behind(lab):
    # Given a client with two running jobs and a third one pending (no CPU free)
    death_timeout = 5
    p = start_script(lab, "killed", rf'''
        cluster = SLURMCluster(cores=1, walltime="00:05:00", log_directory=LOGDIR,
                               death_timeout={death_timeout})
        cluster.scale(jobs=2)
        cluster.wait_for_workers(2, timeout=60)
        cluster.scale(jobs=3)
        wait_until(lambda: cluster.jobs.get("2") == "PENDING", 10, "a pending job")
        report["job_ids"] = cluster.job_ids
        done()
        time.sleep(600)
    ''')
    report = None
    watchdog = threading.Timer(SCRIPT_TIMEOUT_S, p.kill)  # reading stdout ends, whatever happens
    watchdog.start()
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("REPORT "):
                report = json.loads(line[len("REPORT "):])
                break
    finally:
        watchdog.cancel()
    assert report is not None, "the client script ended early"
    # When it is SIGKILLed (nothing of it runs its clean-up)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    killed = time.monotonic()
    # Then the running jobs end after the death timeout, the pending one starts, finds no
    # scheduler within the death timeout and ends, with a message saying so in its log
    left = lab.wait_queue_empty(4 * death_timeout + 20)
    assert left == [], left
    took = time.monotonic() - killed
    pending_log = job_log(lab, report["job_ids"]["2"])
    assert "cannot reach the scheduler" in pending_log, pending_log
    assert took < 4 * death_timeout + 20


# ---------------------------------------------------------------------- without SLURM


def test_walltime_forms():
    assert parse_walltime("00:01:00") == 60
    assert parse_walltime("90") == 90 * 60
    assert parse_walltime("1-02:00:00") == 26 * 3600
    assert parse_walltime("2:30") == 150
    assert format_walltime(3725) == "01:02:05"


def test_pbs_job_script():
    cluster = PBSCluster(cores=8, processes=2, memory="16GiB", walltime="02:00:00",
                         queue="regular", account="P123",
                         job_extra_directives=["-l place=excl"],
                         job_script_prologue=["module load python"],
                         scheduler_options={"host": "127.0.0.1", "dashboard": False},
                         log_directory="/tmp")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "#PBS -N zfabric-0" in lines
    assert "#PBS -q regular" in lines and "#PBS -A P123" in lines
    assert "#PBS -l select=1:ncpus=8:mem=16384MB" in lines
    assert "#PBS -l walltime=02:00:00" in lines
    assert "#PBS -l place=excl" in lines
    assert lines.index("module load python") < len(lines) - 1
    launch = lines[-1]
    assert launch.startswith("exec ") and "-m zfabric.deploy.job_launcher" in launch
    assert "--nworkers 2 --nthreads 4" in launch
    assert f"--memory-limit {8 * 2**30}" in launch
    assert "--walltime 7200" in launch and "--lifetime 7140.0" in launch
