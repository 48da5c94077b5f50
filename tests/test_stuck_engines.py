"""A check that hangs on the notebook's engines is reported once, against the code that hung: the engines
are replaced (cluster.restart_engines), so the next check runs on engines that are not stuck, and the
grader reports each check's own answer and leaves no process behind (the engines' nannies included)."""
import os
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest

from syncml_lib import checks
from syncml_lib.cluster import TAG_VARIABLE, mpi_cluster, restart_engines
from syncml_lib.grade import grade_notebook, table
from helpers import still_alive_after


def only_rank_0_reduces(comm, grads, n_local):
    """The hang of issue #23: rank 0 calls reduce, everyone calls bcast."""
    if comm.rank == 0:
        comm.reduce(n_local)
    comm.bcast(None)
    return grads


def weighted_average(comm, grads, n_local):
    n_total = comm.allreduce(n_local)
    average = {}
    for name, grad in grads.items():
        total = np.empty_like(grad)
        comm.Allreduce(n_local * grad, total)
        average[name] = total / n_total
    return average


def mean_where_only_rank_0_reduces(comm, local_values):
    """The same hang in chapter 00's exercise, whose check is light: its ranks enter the function at once."""
    if comm.rank == 0:
        comm.reduce(local_values.sum())
    return comm.bcast(None)


def global_mean(comm, local_values):
    total = np.empty(2)
    comm.Allreduce(np.array([local_values.sum(), local_values.size], dtype=float), total)
    return total[0] / total[1]


def blocks_unless_last_rank():
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank != MPI.COMM_WORLD.size - 1:
        MPI.COMM_WORLD.Barrier()


def engine_pids(view):
    return view.apply_sync(os.getpid)


@pytest.fixture(scope="module")
def view():
    with mpi_cluster(n=3, timeout=90) as view:
        yield view


def test_a_hang_is_reported_once_and_the_next_check_runs_on_new_engines(view):
    old = engine_pids(view)
    reports = []
    for _ in range(2):  # the same hang twice: the same report, each on engines that were not stuck
        with pytest.raises(checks.CheckFailed) as failed:
            checks.check_global_mean(mean_where_only_rank_0_reduces, view, timeout=3)
        reports.append(re.sub(r"\(\d+\.\d s\)", "(t s)", str(failed.value)))
    assert reports[0] == reports[1]
    assert "ranks 0, 1, 2: is still inside your function after 3s" in reports[0], reports[0]
    assert reports[0].count("new ones were started") == 1, reports[0]
    checks.check_global_mean(global_mean, view, timeout=10)  # the right answer passes
    assert still_alive_after(old, seconds=10) == []
    view.execute("seen = (rank, size)")  # the view (and so %px) drives the new engines, set up as before
    assert view.pull("seen") == [(0, 3), (1, 3), (2, 3)]


def test_a_check_after_a_stuck_cell_says_so_and_replaces_the_engines(view, capsys):
    old = engine_pids(view)
    cell = view.apply_async(blocks_unless_last_rank)  # a %%px cell that never returned on ranks 0 and 1
    assert cell.split()[-1].wait(30), "the last rank did not finish the cell"  # only ranks 0 and 1 are busy
    checks.check_global_mean(global_mean, view, timeout=10)
    said = capsys.readouterr().out
    assert "engines of ranks 0, 1 were still busy with an earlier cell" in said, said
    assert "passed on 3 ranks" in said
    assert set(engine_pids(view)).isdisjoint(old)


def test_restart_engines_refuses_a_view_it_did_not_start():
    from syncml_lib.cluster import ClusterError

    class Other:
        client = type("SomeOtherClient", (), {})()
        targets = [0]

    with pytest.raises(ClusterError, match="not started by start_mpi_cluster"):
        restart_engines(Other())


def allreduce_of_a_wrong_size(comm, grads, n_local):
    average = {}
    for name, grad in grads.items():
        total = np.empty(grad.size + 1)
        comm.Allreduce(grad, total)
        average[name] = total
    return average


def test_an_exception_names_the_learners_own_line_and_the_call_it_was_in():
    line = allreduce_of_a_wrong_size.__code__.co_firstlineno + 4
    with pytest.raises(checks.CheckFailed) as failed:
        checks.check_weighted_average(allreduce_of_a_wrong_size, n=2, timeout=20)
    assert f"(line {line} of allreduce_of_a_wrong_size, in mpi4py.MPI.Comm.Allreduce)" in str(failed.value)


def processes_tagged(tag):
    """PIDs of the processes whose environment carries SYNCML_CLUSTER_TAG=tag... (all a grading run starts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(v.startswith(f"{TAG_VARIABLE}={tag}".encode()) for v in environ):
                found.append(int(entry.name))
    return found


def test_the_grader_reports_each_checks_own_answer_after_a_hang_and_leaves_nothing(tmp_path, monkeypatch):
    tag = f"stucktest{os.getpid()}"
    monkeypatch.setenv(TAG_VARIABLE, tag)
    source = Path(__file__).read_text()
    wrong = ("def unweighted(comm, grads, n_local):\n"
             "    return weighted_average(comm, grads, 1)\n")
    nb = nbformat.v4.new_notebook()
    cells = [("import numpy as np\nfrom syncml_lib.cluster import start_mpi_cluster\n"
              "from syncml_lib.checks import check_weighted_average\ncluster, view = start_mpi_cluster(n=2)", []),
             (source[source.index("def only_rank_0_reduces"):source.index("def blocks_unless_last_rank")] + wrong, []),
             ("check_weighted_average(weighted_average, view)", ["check"]),
             ("check_weighted_average(only_rank_0_reduces, view, timeout=4)", ["check"]),
             ("check_weighted_average(weighted_average, view)", ["check"]),
             ("check_weighted_average(unweighted, view)", ["check"]),
             ("cluster.stop_cluster_sync()", [])]
    nb.cells = [nbformat.v4.new_code_cell(code, metadata={"tags": tags}) for code, tags in cells]
    nbformat.write(nb, tmp_path / "06_hang.ipynb")
    rows = grade_notebook(tmp_path / "06_hang.ipynb", time_limit=120)
    assert [row.result for row in rows] == ["passed", "failed", "passed", "failed"], table(rows)
    assert "inside your function after 4s" in rows[1].detail, table(rows)
    assert "mean of the ranks' means" in rows[3].detail and "stuck" not in rows[3].detail, table(rows)
    # not a moment later: with the old stop, an engine's nanny was still there when the grader returned
    assert processes_tagged(tag) == [], "the grader left processes running"
