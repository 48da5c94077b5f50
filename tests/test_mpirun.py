"""The harness every multi-rank test stands on: results by rank, failures named, deadlocks bounded."""
import time

import numpy as np
import pytest

from syncml_lib import mpirun
from syncml_lib.mpirun import MPINotFoundError, MPIRunError, run, run_script
from helpers import alive, descendants


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
