"""The notebooks' cluster: MPI engines ordered by rank, a clear error when it cannot start, nothing left."""
import re
import subprocess
import sys

import pytest

from syncml_lib import cluster as cluster_module
from syncml_lib.cluster import ClusterError, mpi_cluster, start_mpi_cluster
from syncml_lib.mpirun import MPINotFoundError
from helpers import descendants, still_alive_after


def world_size_and_rank_sum():
    from mpi4py import MPI

    return MPI.COMM_WORLD.size, MPI.COMM_WORLD.allreduce(MPI.COMM_WORLD.rank)


def test_engines_form_one_mpi_job_ordered_by_rank_and_all_stop():
    before = set(descendants())
    with mpi_cluster(n=3, timeout=90) as view:
        started = set(descendants()) - before
        assert view.apply_sync(world_size_and_rank_sum) == [(3, 3)] * 3
        view.execute("seen = (rank, size)")  # names start_mpi_cluster defined on every engine
        assert view.pull("seen") == [(0, 3), (1, 3), (2, 3)]
    assert len(started) >= 4, "a controller, mpiexec and its engines were started"
    assert still_alive_after(started) == []


def test_engines_stop_after_an_exception_too():
    before = set(descendants())
    with pytest.raises(ZeroDivisionError):
        with mpi_cluster(n=2, timeout=90) as view:
            started = set(descendants()) - before
            view.execute("1 / 0", block=False)
            1 / 0
    assert started and still_alive_after(started) == []


def stuck_unless_last_rank():
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank != MPI.COMM_WORLD.size - 1:
        MPI.COMM_WORLD.Barrier()  # the last rank never comes: blocked inside MPI, deaf to signals


def test_engines_stuck_in_a_blocking_mpi_call_are_stopped_too():
    before = set(descendants())
    with mpi_cluster(n=3, timeout=90) as view:
        started = set(descendants()) - before
        view.apply_async(stuck_unless_last_rank)
    assert still_alive_after(started, seconds=30) == []


def test_a_cluster_that_does_not_start_in_time_is_stopped_and_explained():
    before = set(descendants())
    with pytest.raises(ClusterError) as info:
        start_mpi_cluster(n=2, timeout=0.01)
    message = str(info.value)
    assert "did not start within 0.01s" in message and "python -m syncml_lib doctor" in message
    assert still_alive_after(set(descendants()) - before) == []


def test_missing_mpiexec_fails_before_starting_anything(monkeypatch):
    def no_mpiexec():
        raise MPINotFoundError("mpiexec was not found. Fix: pip install mpich mpi4py")

    monkeypatch.setattr(cluster_module, "mpiexec_path", no_mpiexec)
    before = set(descendants())
    with pytest.raises(MPINotFoundError, match="pip install mpich"):
        start_mpi_cluster(n=2)
    assert still_alive_after(set(descendants()) - before, seconds=0) == []


def test_missing_mpi4py_names_the_fix(monkeypatch):
    monkeypatch.setattr(cluster_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MPINotFoundError, match="mpi4py is not installed"):
        start_mpi_cluster(n=2)


def test_a_killed_kernel_leaves_no_engines_behind():
    """A notebook kernel killed outright runs no clean-up; the cluster's watcher stops the engines."""
    code = ("from syncml_lib.cluster import start_mpi_cluster\n"
            "cluster, view = start_mpi_cluster(n=2, timeout=90, activate=False)\n"
            "print('up', flush=True)\n"
            "input()\n")
    kernel = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        said = [kernel.stdout.readline().strip() for _ in range(3)]
        assert said[0] == "Starting a controller and 2 MPI engines (mpiexec.gforker -n 2) ...", said
        assert re.fullmatch(r"2 MPI engines ready in \d+\.\d s", said[1]), said
        assert said[2] == "up"
        started = descendants(kernel.pid)
        assert len(started) >= 4
    finally:
        kernel.kill()
        kernel.wait()
    assert still_alive_after(started, seconds=30) == []


def engine_pid():
    import os

    return os.getpid()


def test_with_syncml_profile_a_notebook_attaches_to_the_running_cluster_clears_it_and_leaves_it_running(
        monkeypatch, capsys):
    """SYNCML_PROFILE: start_mpi_cluster attaches to the cluster running in that profile (here the one the
    session started with ipcluster for the notebooks: conftest.py), uses its engines, clears what the
    previous notebook defined, and its stop_cluster_sync() leaves the cluster running. Plain engines, which
    chapter 05b kills, are still started for the notebook alone."""
    import ipyparallel as ipp

    import conftest

    profile = conftest.shared_cluster_profile()
    pids = conftest._shared["pids"]
    monkeypatch.setenv(cluster_module.PROFILE_VARIABLE, profile)
    attached, view = start_mpi_cluster(n=4, activate=False)
    assert isinstance(attached, cluster_module.AttachedCluster)
    assert sorted(view.apply_sync(engine_pid)) == pids            # the running cluster's engines
    assert view.apply_sync(world_size_and_rank_sum) == [(4, 6)] * 4
    view.execute("left_behind = rank")
    attached.stop_cluster_sync()
    assert "keeps running" in capsys.readouterr().out
    again, view = start_mpi_cluster(n=4, activate=False)          # the next notebook
    view.execute("seen = (rank, size, 'left_behind' in globals())")
    assert view.pull("seen") == [(r, 4, False) for r in range(4)]
    with pytest.raises(ClusterError, match=r"needs 5 MPI engines.*has 4 engine"):
        start_mpi_cluster(n=5, activate=False, timeout=2)          # not the engines the chapter needs
    with pytest.raises(ClusterError, match="attached to and cannot restart"):
        cluster_module.restart_engines(view)
    again.stop_cluster_sync()
    owner = ipp.Client(profile=profile, timeout=30)
    assert sorted(owner[:].apply_sync(engine_pid)) == pids         # still running, the same engines
    owner.close()
    # engines that are killed on purpose (chapter 05b) are the notebook's own, and it says so
    from syncml_lib.cluster import start_engine_cluster

    own, client = start_engine_cluster(n=1)
    try:
        assert "these engines are killed on purpose" in capsys.readouterr().out
        assert not set(client[:].apply_sync(engine_pid)) & set(pids) and own.profile == cluster_module.PROFILE
    finally:
        client.close()
        own.stop_cluster_sync()
    monkeypatch.setenv(cluster_module.PROFILE_VARIABLE, profile + "-nothing-there")
    with pytest.raises(ClusterError, match="names no running cluster"):
        start_mpi_cluster(n=4, activate=False, timeout=2)
