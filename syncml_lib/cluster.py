"""Start and stop the notebooks' ipyparallel clusters: MPI engines, or plain engines that can die alone.

    cluster, view = start_mpi_cluster(n=4)   # n engines launched by mpiexec, %px magics active
    %%px
    print(rank, size)                        # runs on every engine; comm, rank, size, np, MPI are there
    cluster.stop_cluster_sync()              # the last cell of every notebook
    restart_engines(view)                    # engines stuck in a call that never returns: new ones, same view

    with mpi_cluster(n=4) as view:           # the same, stopped on exit, also after an exception
        view.apply_sync(f)

    SYNCML_PROFILE=myprofile jupyter lab     # start_mpi_cluster attaches to the cluster already running in
                                             # that IPython profile (ipcluster start --profile myprofile ...)

Attached (SYNCML_PROFILE set), start_mpi_cluster starts nothing: it checks that the running cluster has
the n MPI engines the chapter needs (ranks 0..n-1 of one COMM_WORLD of size n), clears what an earlier
notebook defined on them, and returns an AttachedCluster, whose stop_cluster_sync() only disconnects: the
cluster is not the notebook's to stop. The test suite's notebooks share one cluster this way (conftest.py starts it with
ipcluster). Engines that can die alone (start_engine_cluster) are always the notebook's own.

The engines are one MPI job (`ipp.Cluster(engines="mpi")`), so `MPI.COMM_WORLD` on the engines spans
all of them. `view` is a blocking DirectView whose targets are ordered by MPI rank: `view.apply_sync(f)`
and `view.pull("x")` return one value per rank, rank 0 first, whatever engine ids ipyparallel gave.
"""
import asyncio
import contextlib
import glob
import logging
import importlib.util
import os
import signal
import subprocess
import sys
import time
import weakref

import ipyparallel as ipp
from IPython.paths import get_ipython_dir

from . import mpienv
from .mpirun import FIX, MPINotFoundError, mpiexec_path, same_imports_env

__all__ = ["start_mpi_cluster", "mpi_cluster", "restart_engines", "start_engine_cluster", "engine_cluster",
           "stop_clusters", "attach_mpi_cluster", "AttachedCluster", "ClusterError", "PROFILE", "PROFILE_VARIABLE"]

PROFILE = "syncml"  # clusters live in their own IPython profile, so cleaning up never touches others'
TAG_VARIABLE = "SYNCML_CLUSTER_TAG"  # set by the test suite: every cluster it starts carries the tag
PROFILE_VARIABLE = "SYNCML_PROFILE"  # the IPython profile of a running cluster to attach to, instead of starting one

ENGINE_SETUP = """
from mpi4py import MPI
import numpy as np
comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size
"""


class MPIEnginesLauncher(ipp.cluster.launcher.MPIEngineSetLauncher):
    """ipyparallel's launcher of MPI engines, except that its signals (the SIGTERM of a stop, the SIGKILL
    that follows when that is not enough) go to mpiexec's whole process group, engines included. An
    engine stuck in a blocking MPI call ignores SIGTERM; MPICH's mpiexec.gforker, unlike Hydra's
    mpiexec, does not kill its ranks when it is killed itself, so they would be left running."""

    # how a cluster file names it, so that a watcher or stop_clusters can load the cluster back (ipyparallel
    # would write "syncml_lib.cluster:MPIEnginesLauncher", which it cannot import again)
    entrypoint_name = "syncml_lib.cluster.MPIEnginesLauncher"

    # a stopped engine that ignores SIGTERM (stuck in MPI) gets SIGKILL after 2 s, not ipyparallel's 5 s
    stop_seconds_until_kill = 2

    def signal(self, sig):
        if self.state == "running":
            self._nannies = self._nannies_below() or getattr(self, "_nannies", [])
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)  # ipyparallel starts mpiexec in a new session: pgid == pid

    async def stop(self):
        """Stop the engines, then their nannies. Each engine has a nanny, a process in a session of its own
        that tells the controller when its engine has died and exits; after a stuck engine's SIGKILL a nanny
        was seen waiting for many minutes to deliver that to a controller already gone, so a nanny still
        there after NANNY_GRACE seconds is killed."""
        await super().stop()
        nannies = getattr(self, "_nannies", [])
        deadline = time.monotonic() + NANNY_GRACE
        while any(_running(nanny) for nanny in nannies) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for nanny in nannies:
            with contextlib.suppress(Exception):
                nanny.kill()

    def _nannies_below(self):
        import psutil

        with contextlib.suppress(Exception):
            return [p for p in psutil.Process(self.process.pid).children(recursive=True)
                    if "ipyparallel.engine.nanny" in " ".join(p.cmdline())]
        return []


NANNY_GRACE = 2  # seconds an engine's nanny gets to tell the controller that its engine died, and exit


def _running(process):
    with contextlib.suppress(Exception):
        return process.is_running() and process.status() != "zombie"
    return False


class CourseCluster(ipp.Cluster):
    """ipyparallel's Cluster, started in seconds and stopped in under one.

    - The controller pings the engines every HEARTBEAT_MS instead of every 3 s, and an engine counts
      as registered only after its first answer to a ping: 4 engines are ready in about 2.7 s, not 7 s
      (3.3 s with pings every 500 ms). An engine is declared dead after MISSED_BEATS pings without an
      answer (10 s).
    - It stops the engines first, then the controller. ipyparallel stops both at once, and an engine
      whose controller is already gone takes about 4 s to exit instead of half a second.
    """

    HEARTBEAT_MS, MISSED_BEATS = 100, 100

    def __init__(self, **kwargs):
        kwargs.setdefault("controller_args", [f"--HeartMonitor.period={self.HEARTBEAT_MS}",
                                              f"--HeartMonitor.max_heartmonitor_misses={self.MISSED_BEATS}"])
        super().__init__(**kwargs)

    async def stop_cluster(self):
        await self.stop_engines()
        await self.stop_controller()


class ClusterError(RuntimeError):
    """The cluster could not start (missing MPI, or not up within the time limit)."""


def _check_mpi():
    if importlib.util.find_spec("mpi4py") is None:
        raise MPINotFoundError(f"mpi4py is not installed in this Python. {FIX}")
    return mpiexec_path()


def _profile_dir():
    return os.path.join(get_ipython_dir(), f"profile_{PROFILE}")


def remove_stale_cluster_files():
    """Delete the files of clusters in our profile whose controller is no longer running."""
    for cluster_file in glob.glob(os.path.join(_profile_dir(), "security", "cluster-*.json")):
        try:
            cluster = CourseCluster.from_file(cluster_file, log_level=logging.CRITICAL)
            running = cluster._is_running()
        except Exception:
            cluster, running = None, False
        if not running:
            cluster_id = os.path.basename(cluster_file)[len("cluster-"):-len(".json")]
            for f in glob.glob(os.path.join(_profile_dir(), "security", f"*{cluster_id}*")):
                with contextlib.suppress(OSError):
                    os.remove(f)


def rank_view(client):
    """A blocking DirectView over all engines, ordered by MPI rank."""
    view = client[:]
    view.block = True
    ranks = view.apply_sync(lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.rank)
    by_rank = [engine for _, engine in sorted(zip(ranks, client.ids))]
    view = client[by_rank]
    view.block = True
    return view


def start_mpi_cluster(n=4, timeout=60, activate=True, say=print, attach=True):
    """Start one controller and n MPI engines; return (cluster, view).

    Waits at most `timeout` seconds for all engines; on failure everything started is stopped and
    ClusterError explains what to do. With activate=True the view drives the %px / %%px magics.
    Each engine starts with `comm`, `rank`, `size`, `MPI` and `np` defined. `say` tells what it is
    doing ("4 MPI engines ready in 5.1 s"); say=None is silent. If the environment names a running
    cluster's profile (SYNCML_PROFILE) and attach=True, attach to it instead (attach_mpi_cluster).
    """
    profile = os.environ.get(PROFILE_VARIABLE)
    if attach and profile:
        return attach_mpi_cluster(profile, n, timeout=timeout, activate=activate, say=say)
    _check_mpi()
    cluster = _mpi_cluster_object(n, profile=PROFILE, cluster_id=_new_cluster_id())
    view = _start(cluster, n, timeout, f"{n} MPI engines ({os.path.basename(mpienv.launcher())} -n {n})",
                  f"start_mpi_cluster(n={n}, timeout={2 * timeout})", _prepare_mpi_engines, say)
    _CLUSTER_OF[view.client] = cluster
    if activate:
        view.activate()
        _no_progress_bars()
    return cluster, view


def _mpi_cluster_object(n, profile, cluster_id):
    cluster = CourseCluster(engines=MPIEnginesLauncher, n=n, profile=profile, cluster_id=cluster_id, log_level=40)
    # the course's MPI settings (mpienv): its mpiexec, nothing listening beyond loopback, and waiting
    # ranks that yield their core (more engines than cores)
    cluster.config.MPILauncher.mpi_cmd = [mpienv.launcher()]
    cluster.config.MPIEngineSetLauncher.environment = {**same_imports_env(), **mpienv.mpi_settings()}
    return cluster


def _prepare_mpi_engines(client):
    view = rank_view(client)
    view.use_cloudpickle()  # functions defined in a notebook reach the engines as they are
    view.execute(ENGINE_SETUP)
    return view


class AttachedCluster:
    """A running cluster this notebook attached to (SYNCML_PROFILE): not its own, so stop_cluster_sync(),
    the last cell of every notebook, only disconnects and leaves the engines running."""

    def __init__(self, profile, client):
        self.profile, self.client = profile, client

    def stop_cluster_sync(self):
        self.client.close()
        print(f"Disconnected from the cluster of profile {self.profile!r}, which keeps running (it is not this "
              f"notebook's to stop; ipcluster stop --profile {self.profile} stops it).")


def attach_mpi_cluster(profile, n=4, timeout=60, activate=True, say=print):
    """Attach to the cluster running in IPython profile `profile`; return (AttachedCluster, view).

    It must have n engines that are MPI ranks 0..n-1 of one COMM_WORLD of size n (ClusterError saying what
    it has otherwise); waits up to `timeout` seconds for them to register. What an earlier notebook defined
    on them is cleared (%reset), then they are set up as start_mpi_cluster's are."""
    say = say or (lambda line: None)
    started = time.perf_counter()
    try:
        client = ipp.Client(profile=profile, timeout=timeout)
    except Exception as exc:
        raise ClusterError(f"{PROFILE_VARIABLE}={profile} names no running cluster ({exc}). Start one, for example "
                           f"`ipcluster start --profile {profile} --engines=mpi -n {n} --daemonize`, or unset "
                           f"{PROFILE_VARIABLE} to start a cluster of this notebook's own.") from None
    deadline = time.monotonic() + timeout
    while len(client.ids) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    worlds = client[:].apply_sync(lambda: (__import__("mpi4py.MPI").MPI.COMM_WORLD.rank,
                                           __import__("mpi4py.MPI").MPI.COMM_WORLD.size)) if client.ids else []
    if sorted(worlds) != [(rank, n) for rank in range(n)]:
        client.close()
        raise ClusterError(f"this chapter needs {n} MPI engines, ranks 0..{n - 1} of one COMM_WORLD of size {n}; the "
                           f"cluster of profile {profile!r} has {len(worlds)} engine(s), as (rank, size): "
                           f"{sorted(worlds)}. Start it with `ipcluster start --profile {profile} --engines=mpi "
                           f"-n {n}`, or unset {PROFILE_VARIABLE}.")
    view = client[:]
    view.execute("get_ipython().run_line_magic('reset', '-f')", block=True)  # nothing left by another notebook
    view = _prepare_mpi_engines(client)
    _ATTACHED_TO[client] = profile
    if activate:
        view.activate()
        _no_progress_bars()
    say(f"Attached to the {n} MPI engines of profile {profile!r} ({PROFILE_VARIABLE}) in "
        f"{time.perf_counter() - started:.1f} s")
    return AttachedCluster(profile, client), view


_CLUSTER_OF = weakref.WeakKeyDictionary()  # client -> the cluster it was started with, for restart_engines
_ATTACHED_TO = weakref.WeakKeyDictionary()  # client -> the profile of the running cluster it attached to


def restart_engines(view, timeout=60, say=print):
    """Replace the MPI engines behind `view` by n new ones in the same cluster; return the seconds it took.

    For engines stuck in a blocking call that never returns (a collective some ranks skipped): they do not
    answer an interrupt, since a signal reaches Python only when the MPI call returns. The old engines are
    killed (SIGKILL: the whole MPI job), n new ones start, and `view` itself (and so %px) drives them from
    then on, in rank order, with `comm`, `rank`, `size`, `MPI` and `np` defined. Whatever else was defined
    on the old engines is gone.
    """
    say = say or (lambda line: None)
    cluster = _CLUSTER_OF.get(view.client)
    if view.client in _ATTACHED_TO:
        raise ClusterError(f"these engines belong to the cluster of profile {_ATTACHED_TO[view.client]!r} "
                           f"({PROFILE_VARIABLE}), which this notebook attached to and cannot restart: restart "
                           f"that cluster (ipcluster stop, then start) or ask whoever runs it")
    if cluster is None:
        raise ClusterError("these engines were not started by start_mpi_cluster: stop their cluster and start "
                           "a new one with start_mpi_cluster()")
    client, old, started = view.client, set(view.targets), time.perf_counter()
    n, deadline = len(old), time.monotonic() + timeout
    cluster.signal_engines_sync(signal.SIGKILL)
    cluster.stop_engines_sync()

    def wait_until(done, what):
        while not done():
            if time.monotonic() > deadline:
                raise ClusterError(f"{what} within {timeout}s: stop the cluster (`cluster.stop_cluster_sync()`) "
                                   f"and start a new one")
            time.sleep(0.05)
    # MPI engines ask for their rank as their id: the old ones must be unregistered first
    wait_until(lambda: not old & set(client.ids), "the old engines were not unregistered")
    before = set(client.ids)
    cluster.start_engines_sync(n=n)
    wait_until(lambda: len(set(client.ids) - before) >= n, f"{n} new engines did not register")
    new = sorted(set(client.ids) - before)
    ranks = client[new].apply_sync(lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.rank)
    view.targets = [engine for _, engine in sorted(zip(ranks, new))]
    view.use_cloudpickle()
    view.execute(ENGINE_SETUP, block=True)
    took = time.perf_counter() - started
    say(f"{n} new MPI engines ready in {took:.1f} s")
    return took


def start_engine_cluster(n=4, timeout=60, say=print):
    """Start one controller and n plain (non-MPI) engines, each its own process; return (cluster, client).

    Unlike MPI engines, one of these can die alone (kill it, or a task that crashes it) and the others go
    on; ipyparallel's nanny, a small process beside each engine, tells the controller at once. More
    engines join with add_engines(cluster, client, n). Time limit, clean-up and messages as for
    start_mpi_cluster.
    """
    if os.environ.get(PROFILE_VARIABLE):
        (say or (lambda line: None))(
            f"{PROFILE_VARIABLE} names a shared cluster, but these engines are killed on purpose: this "
            f"notebook starts {n} engines of its own, on this machine, and stops them at its end.")
    cluster = CourseCluster(n=n, profile=PROFILE, cluster_id=_new_cluster_id(), log_level=40)
    cluster.config.LocalEngineSetLauncher.environment = same_imports_env()

    def prepare(client):
        client[:].use_cloudpickle()
        return client
    return cluster, _start(cluster, n, timeout, f"{n} engines", f"start_engine_cluster(n={n}, timeout={2 * timeout})",
                           prepare, say)


def add_engines(cluster, client, n=1, timeout=30):
    """Start n more plain engines (replacements for dead ones) and wait until they have registered;
    return their ids.

    Not client.wait_for_engines: once one of the cluster's engine sets has stopped entirely (the one
    engine started with it died), that call fails at once with "Engine set stopped".
    """
    if n < 1:
        return []
    before = set(client.ids)
    cluster.start_engines_sync(n=n)
    deadline = time.monotonic() + timeout
    while len(set(client.ids) - before) < n:
        if time.monotonic() > deadline:
            raise ClusterError(f"{n} new engine(s) did not register within {timeout}s "
                               f"(engines now: {client.ids})")
        time.sleep(0.05)
    return sorted(set(client.ids) - before)


def _new_cluster_id():
    tag = os.environ.get(TAG_VARIABLE, "syncml")
    return f"{tag}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def _start(cluster, n, timeout, what, longer, prepare, say):
    """Start the cluster, wait for its n engines and return prepare(client). On failure stop everything
    and raise ClusterError; on success start the watcher (_watch) that stops it if this process dies."""
    say = say or (lambda line: None)
    remove_stale_cluster_files()
    mpienv.remove_leaked_shared_memory()
    started = time.perf_counter()
    say(f"Starting a controller and {what} ...")
    try:
        cluster.start_cluster_sync()
        client = cluster.connect_client_sync()
        client.wait_for_engines(n, timeout=timeout, interactive=False)
        ready = prepare(client)
    except Exception as exc:
        with contextlib.suppress(Exception):
            cluster.stop_cluster_sync()
        took = time.perf_counter() - started
        raise ClusterError(
            f"The cluster of {what} did not start within {timeout}s ({took:.0f}s spent: {exc!r}). "
            f"It was stopped. Run `python -m syncml_lib doctor` to find the cause; on a slow machine "
            f"pass a longer timeout, e.g. {longer}."
        ) from exc
    _watch(cluster)
    say(f"{n} {'MPI engines' if 'MPI' in what else 'engines'} ready in {time.perf_counter() - started:.1f} s")
    return ready


def _watch(cluster):
    """Start a small process that stops the cluster if this process dies without stopping it.

    A kernel that is killed (a crash, `kill -9`, a test runner's hard shutdown) runs no clean-up,
    and ipyparallel leaves its controller and engines running; the watcher ends them. It exits by
    itself as soon as the cluster is stopped normally (its cluster file is gone).
    """
    subprocess.Popen([sys.executable, "-m", "syncml_lib.cluster", "watch", str(os.getpid()), cluster.cluster_file],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def watch(pid, cluster_file, every=0.5):
    """Wait until the cluster file is gone (stopped normally) or process `pid` is dead (then stop it)."""
    while os.path.exists(cluster_file):
        if not _alive(pid):
            with contextlib.suppress(Exception):
                CourseCluster.from_file(cluster_file, log_level=logging.CRITICAL).stop_cluster_sync()
            return
        time.sleep(every)


def _no_progress_bars():
    """Long %%px cells would store a progress bar in the notebook's outputs: switch it off, and keep
    every engine's output. ipyparallel's own way to switch the bar off (progress_after_seconds = -1)
    returns as soon as the results are in, before all the streamed output has arrived, so a cell
    could show three ranks' lines of four. Waiting "a billion seconds" before the bar waits for the
    results and then for their output, and never shows a bar (an interrupt still ends the wait)."""
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        get_ipython().magics_manager.registry["ParallelMagics"].progress_after_seconds = 10**9


@contextlib.contextmanager
def mpi_cluster(n=4, timeout=60, activate=False):
    """`with mpi_cluster(n) as view:` start a cluster, yield its rank-ordered view, always stop it."""
    cluster, view = start_mpi_cluster(n, timeout=timeout, activate=activate, say=None, attach=False)
    try:
        yield view
    finally:
        with contextlib.suppress(Exception):
            view.client.close()
        cluster.stop_cluster_sync()


@contextlib.contextmanager
def engine_cluster(n=4, timeout=60):
    """`with engine_cluster(n) as (cluster, client):` plain engines, always stopped on exit."""
    cluster, client = start_engine_cluster(n, timeout=timeout, say=None)
    try:
        yield cluster, client
    finally:
        with contextlib.suppress(Exception):
            client.close()
        cluster.stop_cluster_sync()


def stop_clusters(tag=None):
    """Stop every running cluster in our profile (only those whose id starts with `tag`, if given).

    The test suite calls this at its end, so a notebook whose last cell never ran leaves nothing.
    Returns the ids of the clusters it stopped.
    """
    stopped = []
    for cluster_file in glob.glob(os.path.join(_profile_dir(), "security", "cluster-*.json")):
        try:
            cluster = CourseCluster.from_file(cluster_file, log_level=logging.CRITICAL)
        except Exception:
            continue
        if tag and not cluster.cluster_id.startswith(tag):
            continue
        if cluster._is_running():
            with contextlib.suppress(Exception):
                cluster.stop_cluster_sync()
            stopped.append(cluster.cluster_id)
    remove_stale_cluster_files()
    return stopped


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    watch(int(sys.argv[2]), sys.argv[3])
