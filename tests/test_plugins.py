"""Worker and Nanny plugins, upload_file and --preload, with real worker processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from userscript import run_script

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftover_processes")]


def test_plugins_upload_file_and_preload_reach_current_and_later_workers(tmp_path):
    # Given a script with a plugin class in __main__, a module to upload, and a preload file
    out = run_script(tmp_path, """
        import os
        import subprocess
        import sys
        import time

        from zfabric import Client, LocalCluster, get_worker
        from zfabric.plugins import NannyPlugin, WorkerPlugin


        class Tag(WorkerPlugin):
            name = "tag"

            def setup(self, worker):
                worker.tag = "tagged"
                worker.seen = []
                self.worker = worker

            def teardown(self, worker):
                worker.tag = "torn down"

            def transition(self, key, start, finish, **kwargs):
                self.worker.seen.append((key, start, finish))


        class Env(NannyPlugin):
            def setup(self, nanny):
                os.environ["FROM_NANNY_PLUGIN"] = "yes"


        def report(dask_worker):
            import shipped
            return (getattr(dask_worker, "tag", None), shipped.VALUE,
                    getattr(dask_worker, "preloaded", None),
                    os.environ.get("FROM_NANNY_PLUGIN"))


        def use_shipped(x):
            import shipped
            return shipped.VALUE + x


        def transitions():
            w = get_worker()
            return [s[1:] for s in w.seen]


        if __name__ == "__main__":
            env = dict(os.environ)  # for the processes started below (the cluster's Nanny
            # runs in this process, and the Nanny plugin sets its environment)
            with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, \\
                    Client(cluster) as client:
                print("registered", list(client.register_plugin(Tag()).values()))
                print("nanny plugin", list(client.register_plugin(Env(), name="env").values()))
                client.upload_file("shipped.py")
                os.rename("shipped.py", "not_importable_here.py")
                print("task", client.submit(use_shipped, 1).result())
                import zipfile
                with zipfile.ZipFile("bundle.zip", "w") as z:
                    z.writestr("zipped_pkg/__init__.py", "ANSWER = 42")
                client.upload_file("bundle.zip")
                print("zip", client.submit(lambda: __import__("zipped_pkg").ANSWER).result())
                print("transitions", client.submit(transitions, pure=False).result()[:1])

                # Workers that join later: a worker and a nanny from the command line, with
                # a preload file
                cmds = [[sys.executable, "-m", "zfabric", kind, cluster.scheduler_address,
                         "--preload", "preload.py", "--nthreads", "1", "--log-level", "error"]
                        for kind in ("worker", "nanny")]
                procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
                         for cmd in cmds]
                try:
                    client.wait_for_workers(3, timeout=30)
                    reports = sorted(client.run(report).values(), key=str)
                    print("reports", reports)
                    client.unregister_worker_plugin("tag")
                    print("after", sorted(client.run(
                        lambda dask_worker: dask_worker.tag).values()))
                    try:
                        client.unregister_worker_plugin("tag")
                    except ValueError as exc:
                        print("unknown", "tag" in str(exc))
                finally:
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.wait(20)
    """, files={
        "shipped.py": "VALUE = 41\n",
        "preload.py": """
            def dask_setup(worker):
                worker.preloaded = worker.address.startswith("tcp://")
        """,
    })
    assert "registered [{'status': 'OK'}]" in out
    assert "nanny plugin [{'status': 'OK'}]" in out  # the cluster's Nanny
    assert "task 42" in out and "zip 42" in out
    assert "transitions [('released', 'ready')]" in out
    # The first worker (no preload), then the nanny's worker (preload, env from the Nanny
    # plugin), then the bare worker (preload)
    # The cluster's worker (started before the Nanny plugin, without preload), the bare
    # worker (preload), and the later Nanny's worker (preload, environment from the plugin)
    assert "reports [('tagged', 41, None, None), ('tagged', 41, True, 'yes'), ('tagged', 41," \
        " True, None)]" in out, out
    assert "after ['torn down', 'torn down', 'torn down']" in out
    assert "unknown True" in out


def test_scheduler_preload_is_refused_with_a_reason():
    r = subprocess.run([sys.executable, "-m", "zfabric", "scheduler", "--preload", "x.py"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "runs no user code" in r.stderr
