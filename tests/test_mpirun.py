"""The harness every multi-rank test stands on: results by rank, failures named, deadlocks bounded."""
import time

import numpy as np
import pytest

from syncml_lib import mpirun
from syncml_lib.mpirun import MPINotFoundError, MPIRunError, run, run_script
from helpers import alive, descendants, still_alive_after


@pytest.fixture(autouse=True)
def jobs_of_their_own():
    """These tests are about a job per call (the learner's way); the reused jobs have their own tests below."""
    reusing = mpirun._reusing
    mpirun.reuse_jobs(False)
    yield
    mpirun.reuse_jobs(reusing)


def rank_and_sum(comm, offset):
    mine = np.array([comm.rank + offset], dtype=np.float64)
    total = np.empty(1)
    comm.Allreduce(mine, total)
    return comm.rank, comm.size, total[0]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_results_come_back_by_rank(n):
    results = run(rank_and_sum, n, 10, timeout=60)
    expected_total = sum(r + 10 for r in range(n))
    assert results == [(r, n, expected_total) for r in range(n)]


def fails_on_rank_two(comm):
    if comm.rank == 2:
        raise ValueError("rank two is unhappy")
    comm.Barrier()  # the others wait for rank 2, which never comes: the abort must end them
    return comm.rank


def test_a_failing_rank_is_named_with_its_traceback_and_the_job_ends_fast():
    start = time.perf_counter()
    with pytest.raises(MPIRunError) as info:
        run(fails_on_rank_two, 4, timeout=60)
    message = str(info.value)
    assert time.perf_counter() - start < 30, "an abort must not wait for the timeout"
    assert "rank 2 raised" in message and "ValueError: rank two is unhappy" in message
    assert "fails_on_rank_two" in message


def deadlock(comm):
    if comm.rank == 0:
        comm.Barrier()  # rank 1 never enters the barrier
    return "finished"


def test_a_deadlock_fails_within_its_timeout_and_leaves_no_process():
    before = set(descendants())
    start = time.perf_counter()
    with pytest.raises(MPIRunError) as info:
        run(deadlock, 2, timeout=4)
    elapsed = time.perf_counter() - start
    assert 4 <= elapsed < 15
    assert "timed out after 4s" in str(info.value)
    assert "ranks [0] were still running" in str(info.value)
    time.sleep(0.5)
    assert alive(set(descendants()) - before) == []


def test_run_script_returns_output_and_raises_on_failure(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("from mpi4py import MPI\nprint('rank', MPI.COMM_WORLD.rank)\n")
    out = run_script(good, n=3, timeout=60)
    assert sorted(out.stdout.split("\n")[:-1]) == ["rank 0", "rank 1", "rank 2"]
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(MPIRunError, match="exited with code"):
        run_script(bad, n=2, timeout=60)


def test_bad_rank_count_is_refused():
    with pytest.raises(ValueError, match="positive number of ranks"):
        run(rank_and_sum, 0, 1)


def test_missing_mpiexec_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(mpirun.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MPINotFoundError, match="pip install mpich mpi4py"):
        mpirun.mpiexec_path()


def hangs_at_exit(comm):
    import atexit
    import time
    if comm.rank == 1:
        atexit.register(time.sleep, 100)  # after its result is saved: like an MPI shutdown that hangs
    return comm.rank


def test_a_job_whose_ranks_all_returned_but_that_hangs_on_exit_gives_its_results_with_a_warning(monkeypatch):
    monkeypatch.setattr(mpirun, "EXIT_GRACE", 2)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="every rank .* returned, but mpiexec had not exited 2s later"):
        assert run(hangs_at_exit, 3, timeout=60) == [0, 1, 2]
    assert time.monotonic() - start < 20      # the grace period, not the timeout


# ---------------------------------------------------------------- reused jobs (the test suite's way, #24)

def pid_and_sum(comm, offset):
    import os

    return os.getpid(), rank_and_sum(comm, offset)


def a_duplicate_of_the_world(comm):
    from mpi4py import MPI

    return comm.Compare(MPI.COMM_WORLD) == MPI.CONGRUENT


def test_reused_jobs_run_case_after_case_in_the_same_processes_each_on_a_fresh_comm():
    mpirun.reuse_jobs(True)
    first, second = run(pid_and_sum, 3, 1), run(pid_and_sum, 3, 2)
    assert [pid for pid, _ in first] == [pid for pid, _ in second]
    assert [result for _, result in second] == [(r, 3, sum(x + 2 for x in range(3))) for r in range(3)]
    assert run(a_duplicate_of_the_world, 2) == [True, True]


def test_a_broken_case_in_a_reused_job_is_named_and_its_neighbours_pass():
    mpirun.reuse_jobs(True)
    before = [pid for pid, _ in run(pid_and_sum, 4, 0)]
    with pytest.raises(MPIRunError) as raised:
        run(fails_on_rank_two, 4, timeout=60)
    assert "fails_on_rank_two on 4 ranks failed" in str(raised.value)
    assert "rank 2 raised" in str(raised.value) and "ValueError: rank two is unhappy" in str(raised.value)
    after = run(pid_and_sum, 4, 0)  # the next case gets a new job: the failed one aborted
    assert [result for _, result in after] == [(r, 4, 6.0) for r in range(4)]
    assert alive(before) == []
    with pytest.raises(MPIRunError) as hung:
        run(deadlock, 4, timeout=2)
    assert "deadlock on 4 ranks failed" in str(hung.value) and "timed out after 2s" in str(hung.value)
    assert "ranks [0] were still running" in str(hung.value)
    assert run(rank_and_sum, 4, 1) == [(r, 4, 10.0) for r in range(4)]


def test_a_call_with_other_mpi_settings_gets_a_job_of_its_own(monkeypatch):
    mpirun.reuse_jobs(True)
    reused = {pid for pid, _ in run(pid_and_sum, 2, 0)}
    monkeypatch.setenv("MPIR_CVAR_ASYNC_PROGRESS", "0")
    own = {pid for pid, _ in run(pid_and_sum, 2, 0)}
    assert own.isdisjoint(reused)


def test_a_first_call_with_other_mpi_settings_does_not_take_the_reused_job_from_the_calls_after_it(monkeypatch):
    """The pools keep the environment reuse_jobs was turned on in: a call with other settings that comes
    first for its rank count (the network tests did) runs in a job of its own, and the calls after it
    still share one job (they ran each in a job of its own, a second each, for the rest of the session)."""
    mpirun.reuse_jobs(True)
    monkeypatch.setenv("MPIR_CVAR_ASYNC_PROGRESS", "0")
    first = {pid for pid, _ in run(pid_and_sum, 3, 0)}
    monkeypatch.delenv("MPIR_CVAR_ASYNC_PROGRESS")
    after = [{pid for pid, _ in run(pid_and_sum, 3, 0)} for _ in range(2)]
    assert after[0] == after[1] and after[0].isdisjoint(first)


def test_a_reused_job_is_replaced_after_its_quota_of_cases_and_nothing_is_left_when_reuse_stops(monkeypatch):
    mpirun.reuse_jobs(True)
    monkeypatch.setattr(mpirun._Pool, "CASES_PER_JOB", 2)
    pids = [run(pid_and_sum, 2, 0)[0][0] for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]
    # the reused jobs' processes (mpiexec and its ranks), not the session's shared cluster (conftest)
    started = {pid for pool in mpirun._POOLS.values() for pid in [pool.proc.pid, *descendants(pool.proc.pid)]}
    assert pids[2] in started
    mpirun.reuse_jobs(False)
    assert still_alive_after(started, seconds=5) == []


def breaks_the_library(comm):
    import syncml_lib.scheduler as scheduler

    scheduler.guided_chunk = lambda remaining, workers, min_chunk: "broken"  # and never put back
    return scheduler.guided_chunk(10, 2, 1)


def guided_chunk_of_10_on_2(comm):
    from syncml_lib.scheduler import guided_chunk

    return guided_chunk(10, 2, 1)


def test_a_case_that_rebinds_a_library_function_leaves_the_next_case_the_original():
    mpirun.reuse_jobs(True)
    assert run(guided_chunk_of_10_on_2, 2) == [5, 5]  # the module is loaded on the ranks from here on
    assert run(breaks_the_library, 2) == ["broken", "broken"]
    assert run(guided_chunk_of_10_on_2, 2) == [5, 5]
