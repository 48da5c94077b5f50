"""Test-session hooks, for tests/ and for the notebooks nbval runs.

Every ipyparallel cluster started during the session (by a test or a notebook kernel, which inherits
this environment) carries a session tag in its id; at the end of the session any of them still
running is stopped, so a notebook whose last cell never ran leaves no engines behind.
"""
import os


def pytest_configure(config):
    os.environ.setdefault("SYNCML_CLUSTER_TAG", f"syncml-test-{os.getpid()}")
    config.addinivalue_line("markers", "after_notebooks: runs after every other item of the session")
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT: the tests that interrupt the runs would then find Ctrl-C lost. Give them Python's handler.
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# The chapter notebooks under nbval, and the solutions the grading tests run, attach to one cluster of 4 MPI
# engines that the session starts once, the way a teacher would (`ipcluster start --profile ... --engines=mpi
# -n 4 --daemonize`), instead of each starting and stopping one: SYNCML_PROFILE makes start_mpi_cluster
# attach (cluster.attach_mpi_cluster clears the engines between notebooks). SYNCML_SHARED_CLUSTER=0 turns it
# off. Every other test runs without the variable, so its clusters are its own.
_shared = {}


def shared_cluster_profile():
    """The profile of the session's shared cluster, started the first time it is asked for; its engines'
    pids are kept in _shared["pids"] (tests/test_shared_cluster.py checks them after the notebooks)."""
    if "profile" not in _shared:
        import subprocess
        import sys

        import ipyparallel as ipp

        from syncml_lib import mpienv
        from syncml_lib.mpirun import same_imports_env

        profile = f"{os.environ['SYNCML_CLUSTER_TAG']}-shared"
        ipcluster = os.path.join(os.path.dirname(sys.executable), "ipcluster")
        # the course's MPI settings and mpiexec (nothing listening beyond loopback), and the quick heartbeat
        # of cluster.CourseCluster (engines count as registered after their first answer to a ping)
        subprocess.run([ipcluster, "start", f"--profile={profile}", "--engines=mpi", "-n", "4", "--daemonize",
                        f"--MPILauncher.mpi_cmd={mpienv.launcher()}", "--log-level=WARN",
                        "--Cluster.controller_args=--HeartMonitor.period=100"],
                       env=mpienv.mpi_environment({**os.environ, **same_imports_env()}), check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _shared["profile"] = profile
        client = ipp.Client(profile=profile, timeout=60)
        client.wait_for_engines(4, timeout=60, interactive=False)
        _shared["pids"] = sorted(client[:].apply_sync(os.getpid))
        client.close()
        cluster_file = os.path.join(ipp.Cluster(profile=profile).profile_dir, "security", "cluster-.json")
        # if pytest dies without stopping it, cluster.watch does (as for every cluster the course starts)
        subprocess.Popen([sys.executable, "-m", "syncml_lib.cluster", "watch", str(os.getpid()), cluster_file],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    return _shared["profile"]


def _wait_for_exit(profile, seconds=10):
    """Until no process's command line names the profile (the cluster's controller, engines, nannies)."""
    import time
    from pathlib import Path

    def running():
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if profile.encode() in cmdline.read_bytes():
                    return True
            except OSError:
                pass
        return False
    deadline = time.monotonic() + seconds
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)


def _share_cluster():
    return os.environ.get("SYNCML_SHARED_CLUSTER", "1") != "0"


import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
    """Tests marked after_notebooks run last, once the chapter notebooks have run."""
    items.sort(key=lambda item: item.get_closest_marker("after_notebooks") is not None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A chapter notebook's kernel (started at its first cell) attaches to the shared cluster."""
    if item.nodeid.startswith("notebooks/") and _share_cluster():
        os.environ["SYNCML_PROFILE"] = shared_cluster_profile()
        _shared.setdefault("notebooks", set()).add(os.path.basename(item.nodeid.split("::")[0]))
    else:
        os.environ.pop("SYNCML_PROFILE", None)


@pytest.fixture
def shared_cluster(monkeypatch):
    """For a test whose notebooks should attach to the session's shared cluster (grading the solutions)."""
    if _share_cluster():
        monkeypatch.setenv("SYNCML_PROFILE", shared_cluster_profile())


def pytest_collection_finish(session):
    """The many small multi-rank cases run inside one long-lived mpiexec job per rank count
    (mpirun.reuse_jobs), turned on once the tests are collected: the jobs keep the environment of this
    moment, sys.path (PYTHONPATH for the ranks) with the test folders pytest added to it included."""
    from syncml_lib import mpirun

    mpirun.reuse_jobs(os.environ.get("SYNCML_REUSE_JOBS", "1") != "0")


def pytest_sessionfinish(session, exitstatus):
    from syncml_lib import mpirun
    from syncml_lib.cluster import stop_clusters

    mpirun.reuse_jobs(False)
    os.environ.pop("SYNCML_PROFILE", None)
    if "profile" in _shared:
        import shutil

        import ipyparallel as ipp

        cluster = ipp.Cluster.from_file(profile=_shared["profile"], cluster_id="")
        try:
            cluster.stop_cluster_sync()
        finally:
            _wait_for_exit(_shared["profile"])  # or a process on its way out writes its log there again
            shutil.rmtree(cluster.profile_dir, ignore_errors=True)

    stopped = stop_clusters(tag=os.environ["SYNCML_CLUSTER_TAG"])
    if stopped:
        print(f"\nconftest: stopped {len(stopped)} cluster(s) left running: {stopped}")


def pytest_runtest_teardown(item):
    """A test must leave Ctrl-C as it found it (pytest_configure): Python's default handler, which raises
    KeyboardInterrupt (a library that left another handler in place would swallow a learner's interrupt)."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    if handler is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise AssertionError(f"{item.nodeid} left SIGINT handled by {handler!r}, not Python's default handler")


# ---------------------------------------------------------------- the suite's time, by chapter (#24)

# the chapter of a test file whose test names do not say it; a name with "NN_" in it (a notebook, a graded
# solution or exercise, a parametrized check) belongs to that chapter
CHAPTER_OF_FILE = {
    "test_synchronize": "01", "test_barrier_spread": "01", "test_viz_rank_figures": "01",
    "test_parameter_server": "02", "test_rpc": "02",
    "test_allreduce": "03", "test_trace": "03",
    "test_data": "04", "test_kvstore": "04",
    "test_scheduler": "05", "test_engine_scheduler": "05b", "test_interrupts": "05b",
    "test_training": "06", "test_viz_training": "06", "test_overlap": "06",
    "test_compression": "07", "test_costmodel": "07", "test_hierarchical": "07", "test_scaling": "07",
    "test_secure_aggregation": "07",
}
_seconds = {}  # test id -> seconds (setup + call + teardown)


def pytest_runtest_logreport(report):
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def _chapter_and_kind(nodeid):
    import re

    path = nodeid.split("::")[0]
    named = re.search(r"\b(\d\d[a-z]?)_[a-z]", nodeid)
    stem = os.path.splitext(os.path.basename(path))[0]
    chapter = named.group(1) if named else CHAPTER_OF_FILE.get(stem, "course")
    if path.startswith("notebooks/"):
        return chapter, "notebook"
    if stem == "test_grade":
        return chapter, "grading"
    return chapter, "tests"


def pytest_terminal_summary(terminalreporter):
    """At the end of every run: its time per chapter (the chapter notebook under nbval, its solutions and
    exercises graded, its library tests) and its 20 slowest items, so what a new chapter costs shows."""
    if not _seconds:
        return
    kinds = ("notebook", "grading", "tests")
    table = {}
    for nodeid, seconds in _seconds.items():
        chapter, kind = _chapter_and_kind(nodeid)
        table.setdefault(chapter, dict.fromkeys(kinds, 0.0))[kind] += seconds
    write = terminalreporter.write_line
    write("")
    write("time per chapter, in seconds (notebook under nbval | solutions and exercises graded | tests)")
    write(f"{'chapter':>8} | {'notebook':>8} | {'grading':>8} | {'tests':>8} | {'total':>8}")
    for chapter in sorted(table, key=lambda c: (c == "course", c)):
        row = table[chapter]
        write(f"{chapter:>8} | " + " | ".join(f"{row[k]:8.1f}" for k in kinds) + f" | {sum(row.values()):8.1f}")
    write(f"{'all':>8} | " + " | ".join(f"{sum(r[k] for r in table.values()):8.1f}" for k in kinds)
          + f" | {sum(_seconds.values()):8.1f}")
    write("")
    write("the 20 slowest items (seconds):")
    for nodeid, seconds in sorted(_seconds.items(), key=lambda item: -item[1])[:20]:
        write(f"{seconds:8.1f}  {nodeid}")
