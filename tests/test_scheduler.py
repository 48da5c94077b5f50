"""scheduler.py: the three rules in process; run_tasks under real mpiexec with 2-5 ranks, every schedule,
stragglers, silent ("dead") workers with and without leases, failures and bad arguments.

Results are checked against task_fn applied sequentially; assignments against data.block_range and
cyclic_range. Where timing matters (a straggler, a lease that is too short), the margins are wide: a
task 50 times slower, a lease 30 times shorter than the task."""
import functools
import re
import time

import numpy as np
import pytest

from syncml_lib.data import block_range
from syncml_lib.mpirun import run
from syncml_lib.scheduler import expired_leases, factoring_chunks, guided_chunk, record_result, run_tasks


def square(task):
    return task * task


# ----------------------------------------------------------------------------- the rules, in process

def test_guided_chunks_shrink_to_the_minimum_and_cover_everything():
    remaining, chunks = 100, []
    while remaining:
        chunks.append(guided_chunk(remaining, 4, 2))
        remaining -= chunks[-1]
    assert chunks[:4] == [25, 19, 14, 11] and sum(chunks) == 100
    assert chunks == sorted(chunks, reverse=True) and min(chunks) >= 1 and chunks[-2] == 2
    assert guided_chunk(1, 4, 5) == 1                      # never more than remains


def test_expired_leases_and_first_result_wins():
    leases = {0: (1, [3, 4], 10.0), 1: (2, [5], 20.0), 2: (3, [6], None)}
    assert expired_leases(leases, 15.0) == [0] and expired_leases(leases, 20.0) == [0, 1]
    done = {}
    assert record_result(done, 3, "first") and not record_result(done, 3, "second") and done == {3: "first"}


# ----------------------------------------------------------------------------- run_tasks under mpiexec

def schedules_job(comm, n_tasks, chunk):
    out = {}
    for schedule in ("static", "cyclic", "dynamic", "guided"):
        result = run_tasks(comm, list(range(n_tasks)), square, schedule=schedule, chunk=chunk)
        out[schedule] = (result.results, sorted(row["task"] for row in result.trace),
                         {row["task"]: row["worker"] for row in result.trace}, result.per_worker)
    return out


@pytest.mark.parametrize("p, n_tasks, chunk", [(2, 7, 1), (3, 0, 1), (3, 1, 2), (4, 2, 1), (4, 30, 3), (5, 13, 1)])
def test_every_schedule_runs_every_task_once_with_the_right_result(p, n_tasks, chunk):
    reports = run(schedules_job, p, n_tasks, chunk, timeout=60)
    assert all(report == reports[0] for report in reports)     # the same result on every rank
    W = p - 1
    for schedule, (results, tasks, worker_of, per_worker) in reports[0].items():
        assert results == [square(t) for t in range(n_tasks)], schedule
        assert tasks == list(range(n_tasks)), schedule           # each result counted once
        assert sum(per_worker) == n_tasks and len(per_worker) == W
        if schedule == "static":
            assert worker_of == {t: w for w in range(W) for t in block_range(n_tasks, W, w)}
        if schedule == "cyclic":
            assert worker_of == {t: t % W for t in range(n_tasks)}


def straggler_job(comm, schedule):
    def task_fn(task):
        time.sleep(0.05 if comm.rank == 1 else 0.001)          # worker 0 (rank 1) is 50 times slower
        return task
    return run_tasks(comm, list(range(60)), task_fn, schedule=schedule).per_worker


def test_dynamic_scheduling_gives_a_straggler_fewer_tasks_and_static_does_not():
    static = run(straggler_job, 4, "static", timeout=60)[0]
    dynamic = run(straggler_job, 4, "dynamic", timeout=60)[0]
    assert static == [20, 20, 20]
    assert dynamic[0] < 10 and sum(dynamic) == 60, dynamic


def silent_job(comm, schedule, lease, die):
    try:
        result = run_tasks(comm, list(range(24)), square, schedule=schedule, chunk=2, lease=lease, die=die)
    except RuntimeError as error:
        return str(error)
    return result.results, result.per_worker, result.reassigned


@pytest.mark.parametrize("schedule", ["static", "dynamic", "guided"])
def test_with_a_lease_nothing_is_lost_when_a_worker_dies(schedule):
    # Worker 1 goes silent at the second task of its first hand-out, which holds at least 2 tasks under
    # every schedule here (chunk=2): it dies holding tasks whatever the timing. (Dying after its third
    # task, it could find the queue empty by then, and then nothing was reassigned: a flaky test.)
    reports = run(silent_job, 4, schedule, 0.2, {1: 1}, timeout=60)
    results, per_worker, reassigned = reports[0]
    assert results == [square(t) for t in range(24)]
    assert per_worker[1] == 0               # silent before reporting its first hand-out: others did it all
    assert reassigned and all(worker == 1 for _, worker in reassigned)
    assert all(report == reports[0] for report in reports)


def test_without_a_lease_a_dead_workers_tasks_are_named_on_every_rank():
    reports = run(silent_job, 4, "dynamic", None, {0: 0}, timeout=60)   # dies holding its first chunk of 2
    assert all(re.fullmatch(r"2 of 24 tasks never finished \(\[(\d+), (\d+)\]\): a worker went silent holding "
                            r"them, and with lease=None they are never handed out again \(the simulation knows who went "
                            r"silent and ends the run; a real master cannot see it and would wait forever\)", r)
               for r in reports), reports
    first, second = map(int, re.search(r"\[(\d+), (\d+)\]", reports[0]).groups())
    assert second == first + 1 and first % 2 == 0                     # one chunk of the queue


def short_lease_job(comm):
    def task_fn(task):
        time.sleep(0.3 if task == 5 else 0.001)
        return -task
    result = run_tasks(comm, list(range(20)), task_fn, schedule="dynamic", lease=0.01)
    return result.results, result.duplicates, result.reassigned


def test_a_lease_too_short_runs_a_task_twice_but_counts_it_once():
    results, duplicates, reassigned = run(short_lease_job, 3, timeout=60)[0]
    assert results == [-t for t in range(20)]
    assert (5, 0) in reassigned or (5, 1) in reassigned
    assert duplicates >= 1


def failing_job(comm, error):
    def task_fn(task):
        if task == 7:
            raise error
        return task
    try:
        run_tasks(comm, list(range(12)), task_fn, schedule="dynamic")
    except (RuntimeError, KeyboardInterrupt) as caught:
        return type(caught).__name__, str(caught)
    return None


def test_a_raising_task_ends_the_run_on_every_rank():
    reports = run(failing_job, 4, ZeroDivisionError("boom"), timeout=60)
    assert all(r[0] == "RunAborted" and r[1].startswith("worker ") and r[1].endswith("failed on task 7: "
                                                                                      "ZeroDivisionError: boom")
               for r in reports), reports
    assert len(set(reports)) == 1, reports  # one worker failed: every rank names the same one


def test_an_interrupted_task_ends_the_run_on_every_rank():
    reports = run(failing_job, 4, KeyboardInterrupt("stop"), timeout=60)
    assert reports.count(("KeyboardInterrupt", "stop")) == 1, reports  # on the worker that ran task 7
    others = [r for r in reports if r[0] != "KeyboardInterrupt"]
    assert len(others) == 3 and all(r[0] == "RunAborted" and r[1].endswith(
        "was interrupted on task 7 (KeyboardInterrupt); the run was ended on every rank") for r in others), reports


def failing_master_job(comm):
    """A guided chunk that is a float (np.ceil returns one): the master's hand-out raises."""
    import syncml_lib.scheduler as scheduler

    scheduler.guided_chunk = lambda remaining, workers, min_chunk: np.ceil(remaining / workers)
    started = time.monotonic()
    try:
        run_tasks(comm, list(range(12)), square, schedule="guided")
    except RuntimeError as caught:
        return type(caught).__name__, str(caught), time.monotonic() - started
    finally:  # the ranks run case after case (mpirun.reuse_jobs): leave the library as it was
        scheduler.guided_chunk = guided_chunk
    return None


def test_a_failing_master_ends_the_run_on_every_rank_with_its_error():
    """Not a hang until the time limit, with every rank saying it waited for the others."""
    reports = run(failing_master_job, 4, timeout=30)
    for kind, message, seconds in reports:
        assert kind == "RunAborted" and message.startswith("master: TypeError: "), message
        assert seconds < 5


def bad_arguments_job(comm, kwargs):
    try:
        run_tasks(comm, list(range(5)), square, **kwargs)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "fifo"}, "unknown schedule 'fifo'; valid schedules are static, cyclic, dynamic, guided, factoring"),
    ({"chunk": 0}, "chunk must be a positive integer, got 0"),
    ({"lease": -1}, "lease must be a positive number of seconds or None, got -1"),
    ({"die": {5: 1}}, "die names workers [5], but the workers are 0 .. 2"),
])
def test_bad_arguments_fail_on_every_rank(kwargs, message):
    assert run(functools.partial(bad_arguments_job, kwargs=kwargs), 4, timeout=60) == [message] * 4


def test_ranks_that_disagree_all_hear_it():
    def job(comm):
        try:
            run_tasks(comm, list(range(5)), square, chunk=2 if comm.rank == 2 else 1)
        except ValueError as error:
            return str(error)
    reports = run(job, 3, timeout=60)
    assert all("chunks differ across ranks: 1 on ranks 0, 1; 2 on rank 2" in r for r in reports), reports


def test_when_every_worker_dies_the_run_ends_and_names_what_is_missing():
    reports = run(silent_job, 3, "dynamic", 0.05, {0: 1, 1: 2}, timeout=60)
    assert all(r.startswith("of 24 tasks never finished", r.index(" ") + 1) for r in reports), reports


def test_when_every_worker_goes_silent_the_message_names_the_lease_that_was_set():
    reports = run(silent_job, 3, "dynamic", 0.05, {0: 0, 1: 0}, timeout=60)
    assert all("every worker went silent, so no one was left to take them when their lease of 0.05 s per task "
               "expired" in r for r in reports), reports


def static_healthy_job(comm):
    def task_fn(task):
        time.sleep(0.02)
        return task
    result = run_tasks(comm, list(range(12)), task_fn, schedule="static", lease=0.06)
    return result.reassigned, result.duplicates, result.results


def test_a_lease_is_per_task_so_a_big_healthy_chunk_does_not_expire():
    # static hands each of 3 workers its 4 tasks of 20 ms at once: 80 ms of work. A lease of 60 ms per task
    # gives that hand-out 240 ms; a lease of 60 ms for the whole hand-out would expire while it is healthy.
    reassigned, duplicates, results = run(static_healthy_job, 4, timeout=60)[0]
    assert results == list(range(12)) and reassigned == [] and duplicates == 0


@pytest.mark.parametrize("n_tasks, workers, min_chunk", [(100, 4, 1), (48, 3, 1), (7, 3, 2), (1, 5, 1), (0, 2, 1)])
def test_factoring_hands_out_batches_of_w_chunks_of_half_a_share(n_tasks, workers, min_chunk):
    sizes, remaining = factoring_chunks(n_tasks, workers, min_chunk), n_tasks
    assert sum(sizes) == n_tasks
    for start in range(0, len(sizes), workers):
        batch = sizes[start:start + workers]
        want = max(min_chunk, -(-remaining // (2 * workers)))
        assert all(size == min(want, remaining - sum(batch[:i])) for i, size in enumerate(batch)), (sizes, start)
        remaining -= sum(batch)
    assert factoring_chunks(100, 4, 1)[:5] == [13, 13, 13, 13, 6]      # 100 / 8 rounded up, then 48 / 8


def first_draw_straggler_job(comm, schedule):
    state = {"slow": False}

    def task_fn(task):           # the worker that draws task 0 is 4 times slower from then on
        state["slow"] = state["slow"] or task == 0
        time.sleep(0.004 * (4 if state["slow"] else 1))
        return task
    result = run_tasks(comm, list(range(48)), task_fn, schedule=schedule)
    return result.results, result.per_worker, result.makespan


def test_factoring_runs_with_every_task_once_and_gives_the_straggler_half_of_guideds_first_chunk():
    results, per_worker, _ = run(first_draw_straggler_job, 4, "factoring", timeout=60)[0]
    assert results == list(range(48)) and sum(per_worker) == 48
    _, guided_per_worker, _ = run(first_draw_straggler_job, 4, "guided", timeout=60)[0]
    assert max(guided_per_worker) >= 16 > max(per_worker) - 8  # guided's first chunk is 16 of 48, factoring's 8
