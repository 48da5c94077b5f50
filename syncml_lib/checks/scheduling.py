"""Chapter 05's exercises: guided and factoring chunk sizes, expired leases, keeping the first result of a task.

Each check tries the learner's function on a table of cases, then puts it in place of the library's
(scheduler.guided_chunk, .expired_leases, .record_result) and runs a real run_tasks with it: 40 tasks
that take TASK_SECONDS each, long against the short lease of the record_result run, so that leases
really expire and tasks really run twice. Workers are numbered as run_tasks numbers them (its `die`
and its trace): 0 .. W-1 among the workers, worker w being MPI rank w + 1 (rank 0 is the master).
The messages give both.
"""
import copy
import time
from collections.abc import Iterator

from .harness import _anyone, _in_place_of, _is_bool, _is_int, _table, _wrong_type, exercise_check

N_TASKS = 40
TASK_SECONDS = 0.01
NUMBERING = "workers are numbered 0 .. W-1, worker w is rank w + 1"


def _worker(w):
    return f"worker {w} (rank {w + 1})"


def _slow_square(task):
    time.sleep(TASK_SECONDS)
    return task * task


def _describe_run(run_args):
    """The run, for a message: a real run_tasks(40 tasks of 10 ms, schedule='dynamic', chunk=2, lease=0.2,
    worker 0 (rank 1) going silent after 3 tasks)."""
    parts = [f"{N_TASKS} tasks of {TASK_SECONDS * 1000:.0f} ms"] + [f"{k}={v!r}" for k, v in run_args.items()
                                                                    if k != "die"]
    parts += [f"{_worker(w)} going silent after {n} tasks" for w, n in (run_args.get("die") or {}).items()]
    return f"a real run_tasks({', '.join(parts)})"


def _tasks_run_with(comm, name, learner, run_args):
    """A real run_tasks with the learner's function in place of scheduler.<name>: (result, problem), the
    problem None if every task's result came back right and was counted once."""
    from .. import scheduler

    run = _describe_run(run_args)
    try:
        with _in_place_of(scheduler, name, learner):
            result = scheduler.run_tasks(comm, list(range(N_TASKS)), _slow_square, **run_args)
    except Exception as exc:
        return None, f"{run} with your function failed: {type(exc).__name__}: {exc}"
    wrong = [t for t, r in enumerate(result.results) if r != t * t]
    if wrong:
        return result, f"{run} with your function returned a wrong result for task {wrong[0]}"
    counted = {}  # task -> the workers whose results for it were counted, first first
    for row in result.trace:
        counted.setdefault(row["task"], []).append(row["worker"])
    twice = [task for task, workers in sorted(counted.items()) if len(workers) > 1]
    if twice:
        first, second = counted[twice[0]][:2]
        return result, (f"{run}: task {twice[0]} was counted twice, from {_worker(first)} and {_worker(second)}: "
                        f"it ran twice because a lease expired, and your function accepted its second result too "
                        f"({NUMBERING})")
    if len(counted) != N_TASKS:
        return result, f"{run} with your function counted results for {len(counted)} of the {N_TASKS} tasks"
    return result, None


# ---------------------------------------------------------------- guided chunks

GUIDED_CASES = (  # (remaining, workers, min_chunk), expected, why
    ((100, 4, 1), 25, "a quarter of the 100 left: ceil(100 / 4)"),
    ((10, 4, 1), 3, "ceil(10 / 4) = 3: round up, or the last tasks come one at a time"),
    ((6, 4, 2), 2, "ceil(6 / 4) = 2"),
    ((3, 4, 2), 2, "ceil(3 / 4) = 1 is below min_chunk = 2"),
    ((1, 4, 5), 1, "never more than remains: only 1 task is left"),
    ((0, 3, 1), 0, "nothing left: 0"),
)
GUIDED_RUN = dict(schedule="guided", chunk=1)


def _judge_chunk(args, got, expected, why):
    return (_wrong_type(got, _is_int, "a chunk is a number of tasks: return an int")
            or (None if got == expected else f"returned {got}, expected {expected}: {why}"))


def _table_then_run(comm, learner, name, cases, judge, run):
    """On every rank: the learner's function on its table of cases; then, if every rank passed, a real
    run_tasks with it in place of the library's scheduler.<name>."""
    problems = _table(learner, cases, lambda i, args: f"{name}{args}", judge)
    if _anyone(comm, problems) or comm.size < 2:
        return problems
    _, problem = _tasks_run_with(comm, name, learner, run)
    return [problem] if problem else []


@exercise_check(_table_then_run, "guided_chunk", GUIDED_CASES, _judge_chunk, GUIDED_RUN)
def check_guided_chunk(guided_chunk):
    """guided_chunk(remaining, workers, min_chunk) must be the int max(min_chunk, ceil(remaining / workers)),
    capped at remaining."""


# ---------------------------------------------------------------- factoring's chunks

FACTORING_CASES = (  # (n_tasks, workers, min_chunk), expected, why
    ((100, 4, 1), [13, 13, 13, 13, 6, 6, 6, 6, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1],
     "batches of 4 chunks of ceil(remaining / 8): 100 -> 13, 48 -> 6, 24 -> 3, 12 -> 2, 4 -> 1"),
    ((10, 3, 1), [2, 2, 2, 1, 1, 1, 1], "ceil(10 / 6) = 2 for the first batch of 3, then ceil(4 / 6) = 1"),
    ((9, 2, 3), [3, 3, 3], "ceil(9 / 4) = 3 for a batch of 2; then ceil(3 / 4) = 1 is below min_chunk = 3"),
    ((5, 4, 2), [2, 2, 1], "min_chunk 2, but no chunk larger than what is left: 2, 2, 1"),
    ((0, 3, 1), [], "no tasks: no chunks"),
)
FACTORING_RUN = dict(schedule="factoring", chunk=1)


def _judge_chunks(args, got, expected, why):
    if not isinstance(got, (list, tuple)) or not all(_is_int(size) for size in got):
        return f"returned {got!r}: return a list of ints, the chunk sizes in hand-out order"
    got = list(got)
    if got == expected:
        return None
    if sum(got) != args[0]:
        return f"returned {got}, which adds up to {sum(got)} tasks, not {args[0]}; expected {expected}: {why}"
    return f"returned {got}, expected {expected}: {why}"


@exercise_check(_table_then_run, "factoring_chunks", FACTORING_CASES, _judge_chunks, FACTORING_RUN)
def check_factoring_chunks(factoring_chunks):
    """factoring_chunks(n_tasks, workers, min_chunk) must list the chunk sizes: batches of `workers` chunks of
    max(min_chunk, ceil(remaining / (2 workers))), none larger than what is left."""


# ---------------------------------------------------------------- expired leases

# lease id -> (worker, task ids, deadline): lease ids, workers and task ids apart, so a message can say
# which of them an answer returned
LEASES = {10: (0, [30, 31], 10.0), 11: (1, [32], 20.0), 12: (2, [33], None), 13: (0, [34], 12.5)}
NO_DEADLINE = 12
EXPIRY_CASES = (
    (5.0, [], "no deadline has passed at time 5"),
    (10.0, [10], "a deadline equal to now has passed (deadline <= now)"),
    (15.0, [10, 13], "leases 10 (deadline 10.0) and 13 (12.5) have passed"),
    (1e9, [10, 11, 13], "lease 12 has no deadline (None): it never expires"),
)
NEVER_EXPIRES = f"lease {NO_DEADLINE} has no deadline (None): it never expires; skip it"
EXPIRY_RUN = dict(schedule="dynamic", chunk=2, lease=0.1)  # and worker 0 goes silent, when there are 2 workers


def _judge_expiry(args, got, expected, why):
    """What is wrong with expired_leases(LEASES, now) = got: the actual mistake, where it can be named."""
    now = args[1]
    if not isinstance(got, (list, tuple, set)):
        return (f"returned {'None' if got is None else 'a ' + type(got).__name__}: return a list of lease ids"
                + (" (the master removes expired leases from `leases` while it goes through your answer, which a "
                   "lazy iterator over `leases` does not survive)" if isinstance(got, Iterator) else ""))
    try:
        got = sorted(got)
    except TypeError:
        got = list(got)
    if got == expected:
        return None
    strangers = [x for x in got if x not in LEASES]
    if strangers and all(any(x in tasks for _, tasks, _ in LEASES.values()) for x in got):
        return f"returned {got}, task ids: return the lease ids (the keys of `leases`), expected {expected}"
    if strangers and all(any(x == worker for worker, _, _ in LEASES.values()) for x in got):
        return f"returned {got}, worker numbers: return the lease ids (the keys of `leases`), expected {expected}"
    if strangers:
        return (f"returned {got}, expected {expected}: {strangers[0]!r} is not a lease id; the lease ids are the "
                f"keys of `leases`, {sorted(LEASES)}")
    if NO_DEADLINE in got:
        return f"returned {got}, expected {expected}: {NEVER_EXPIRES}"
    ahead = [lease for lease in got if LEASES[lease][2] > now]
    if ahead:
        return (f"returned {got}, expected {expected}: lease {ahead[0]}'s deadline, {LEASES[ahead[0]][2]}, is still "
                f"ahead of now = {now}; a lease has expired when deadline <= now")
    equal = [lease for lease in expected if lease not in got and LEASES[lease][2] == now]
    if equal:
        return (f"returned {got}, expected {expected}: lease {equal[0]}'s deadline is {now}, equal to now, and a "
                f"deadline equal to now has passed: compare deadline <= now, not <")
    return f"returned {got}, expected {expected}: {why}"


def _expiry_on_rank(comm, expired_leases):
    cases = [((copy.deepcopy(LEASES), now), expected, why) for now, expected, why in EXPIRY_CASES]
    problems = _table(expired_leases, cases, lambda i, args: f"expired_leases(leases={LEASES}, now={args[1]})",
                      _judge_expiry, lambda error: f": {NEVER_EXPIRES}" if "NoneType" in error else "")
    if _anyone(comm, problems) or comm.size < 2:
        return problems
    run_args = dict(EXPIRY_RUN, die={0: 3}) if comm.size > 2 else EXPIRY_RUN
    result, problem = _tasks_run_with(comm, "expired_leases", expired_leases, run_args)
    if problem:
        return [problem]
    if "die" in run_args and not result.reassigned:
        return [f"{_describe_run(run_args)}: no task was handed out again, so the run never needed your function "
                f"({NUMBERING})"]
    return []


@exercise_check(_expiry_on_rank)
def check_expired_leases(expired_leases):
    """expired_leases(leases, now) must list the ids of the leases whose deadline is not None and <= now."""


# ---------------------------------------------------------------- the first result counts

RECORD_CASES = (  # (task, result), (what record_result returns, done after the call), why; one `done` for all
    ((3, "first"), (True, {3: "first"}), "task 3 had no result: store it and return True"),
    ((4, 0), (True, {3: "first", 4: 0}), "a result of 0 is a result too"),
    ((3, "second"), (False, {3: "first", 4: 0}), "task 3 has a result already: keep the first, return False"),
    ((4, 16), (False, {3: "first", 4: 0}), "task 4 has a result already, 0: a falsy result (0, None, '') is a "
                                           "result too; ask `task in done`, not `done.get(task)`"),
)
RECORD_RUN = dict(schedule="dynamic", chunk=4, lease=TASK_SECONDS / 4)  # a quarter of each task's time


def _judge_record(args, got, expected, why):
    done, (expected_return, expected_done) = args[0], expected
    return (_wrong_type(got, _is_bool, "return True or False")
            or (f"returned {got!r}, expected {expected_return}: {why}" if got != expected_return else None)
            or (f"left done = {done}, expected {expected_done}: {why}" if done != expected_done else None))


def _record_on_rank(comm, record_result):
    done = {}  # one dict through all the calls, as the master keeps one
    problems = _table(record_result, [((done, *args), expected, why) for args, expected, why in RECORD_CASES],
                      lambda i, args: f"call {i + 1}, record_result(done, {args[1]}, {args[2]!r})", _judge_record)
    if _anyone(comm, problems) or comm.size < 2:
        return problems
    # every lease expires long before its tasks are done: they are handed out again, run twice, and each
    # result must count once (with two workers or more: a lone worker is never handed its own tasks again
    # before the run ends)
    result, problem = _tasks_run_with(comm, "record_result", record_result, RECORD_RUN)
    if problem:
        return [problem]
    if comm.size > 2 and not result.duplicates:
        return [f"{_describe_run(RECORD_RUN)}: no task ran twice, so your function never met a second result: "
                f"run the check again"]
    return []


@exercise_check(_record_on_rank)
def check_record_result(record_result):
    """record_result(done, task, result) must keep the first result of each task and say whether it was new."""
