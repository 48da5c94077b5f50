"""Chapter 05b's exercises: the ready tasks of a graph, and what happens to the tasks of a dead engine.

These checks run in the notebook's kernel, where EngineScheduler's master runs: each tries the learner's
function on a table of cases, then puts it in place of the library's (engine_scheduler.ready_tasks,
.requeue_lost) and runs a real EngineScheduler with it on a cluster of its own (3 or 4 plain engines,
started and stopped by the check, about 3 s), and names the task that was lost, ran twice or started too
early.
"""
import contextlib
import random
import signal
import tempfile
import threading

from .harness import TIMEOUT, CheckFailed, _call, _in_place_of, _table

__all__ = ["check_ready_tasks", "check_requeue_lost"]

GRAPH = {"load": [], "clean": ["load"], "split": ["clean"], "train a": ["split"], "train b": ["split"],
         "evaluate": ["train a", "train b"], "report": ["evaluate"], "plot": ["load"]}
ORDER = list(GRAPH)
READY_CASES = (  # (finished, running), expected, why
    ((set(), set()), ["load"], "at the start only 'load' depends on nothing"),
    (({"load"}, set()), ["clean", "plot"], "'clean' and 'plot' wait only for 'load'"),
    (({"load"}, {"clean"}), ["plot"], "'clean' is running already: do not hand it out again"),
    (({"load", "clean", "split"}, {"plot"}), ["train a", "train b"], "both trainings wait only for 'split'"),
    (({"load", "clean", "split", "train a"}, set()), ["train b", "plot"],
     "'evaluate' needs 'train b' too, and 'train a' is finished: do not hand it out again"),
    ((set(GRAPH), set()), [], "everything has finished: nothing is ready"),
)


def _report(title, problems):
    __tracebackhide__ = True
    if problems:
        raise CheckFailed(f"{title}: {problems[0]}")
    print(f"{title}: passed.")


def _names(tasks):
    return " and ".join(map(repr, tasks))


def _why_not_ready(task, depends_on, finished, running):
    """Why `task` cannot start now: the one rule it breaks."""
    if task in running:
        return f"{task!r} is running already: do not hand it out again"
    if task in finished:
        return f"{task!r} has finished: do not hand it out again"
    waiting = [d for d in depends_on[task] if d not in finished]
    done = [d for d in depends_on[task] if d in finished]
    text = f"{task!r} still waits for {_names(waiting)}, which {'has' if len(waiting) == 1 else 'have'} not finished"
    if done:
        text += (f": {_names(done)} {'has' if len(done) == 1 else 'have'} finished, but every task it depends on "
                 f"must have (all, not any)")
    return text


def _judge_ready(args, got, expected, why):
    """What is wrong with ready_tasks(*args) = got: the first task that should not be there (and the rule it
    breaks), or the first ready task that is missing, or the order. (`why` documents the case.)"""
    queue, depends_on, finished, running = args
    if not isinstance(got, (list, tuple)):
        return f"returned {type(got).__name__}: return a list of tasks, in the queue's order"
    got = list(got)
    if got == expected:
        return None
    shown = f"returned {got}, expected {expected}"
    twice = [t for t in got if got.count(t) > 1]
    if twice:
        return f"{shown}: {twice[0]!r} is there {got.count(twice[0])} times"
    strangers = [t for t in got if t not in queue]
    if strangers:
        return f"{shown}: {strangers[0]!r} is not in the queue"
    if sorted(got) == sorted(expected):
        return f"{shown}: the right tasks, but keep the queue's order"
    extra = [t for t in got if t not in expected]
    if extra:
        return f"{shown}: {_why_not_ready(extra[0], depends_on, finished, running)}"
    missing = next(t for t in expected if t not in got)
    deps = depends_on[missing]
    because = (f"{_names(deps)}, which it depends on, {'has' if len(deps) == 1 else 'have'} finished" if deps
               else "it depends on nothing")
    return f"{shown}: {missing!r} can start: it is neither running nor finished, and {because}"


@contextlib.contextmanager
def _time_limit(seconds, what):
    """A learner's function that loops forever ends the check with CheckFailed after `seconds` (SIGALRM; in
    the kernel's main thread, where cells run; elsewhere without a limit)."""
    __tracebackhide__ = True
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    class GaveUp(BaseException):  # not an Exception: nothing on the way (the learner's code) catches it
        pass

    def give_up(signum, frame):
        raise GaveUp()
    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except GaveUp:
        raise CheckFailed(f"{what}: gave up after {seconds} s; your function never returned (an endless loop?)") \
            from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _graph_run(ready_tasks):
    """A random 16-task graph with the learner's ready_tasks inside a real EngineScheduler on 3 engines."""
    from .. import engine_scheduler
    from ..cluster import engine_cluster

    rng = random.Random(5)
    edges = sorted({tuple(sorted(rng.sample(range(16), 2))) for _ in range(30)})
    with engine_cluster(3) as (_, client), _in_place_of(engine_scheduler, "ready_tasks", ready_tasks):
        sched = engine_scheduler.EngineScheduler(client)
        futures = {}
        for node in range(16):
            futures[node] = sched.submit(_nap, 0.01, name=f"t{node}", after=[futures[a] for a, b in edges if b == node])
        try:
            sched.wait(timeout=20)
        except Exception as exc:
            return [f"a real EngineScheduler with your function, on a graph of 16 tasks and 3 engines, failed: "
                    f"{type(exc).__name__}: {exc}"]
    runs = {}
    for row in sched.records:
        runs.setdefault(row["task"], []).append(row)
    twice = [name for name, rows in runs.items() if len(rows) > 1]
    if twice:
        engines = [row["engine"] for row in runs[twice[0]]]
        return [f"in a real run, task {twice[0]!r} ran {len(engines)} times (engines {engines}): your function "
                f"returned it while it was running or after it had finished"]
    never = [f"t{n}" for n in range(16) if f"t{n}" not in runs]
    if never:
        return [f"in a real run, task {never[0]!r} never ran"]
    for a, b in edges:
        child, parent = runs[f"t{b}"][0], runs[f"t{a}"][0]
        if child["start"] < parent["end"]:
            return [f"in a real run, task 't{b}' started at {1000 * child['start']:.0f} ms, before its dependency "
                    f"'t{a}' ended at {1000 * parent['end']:.0f} ms"]
    return []


def _nap(seconds):
    import time
    time.sleep(seconds)


def check_ready_tasks(ready_tasks, timeout=TIMEOUT):
    """ready_tasks(queue, depends_on, finished, running) must list, in the queue's order, the tasks that are
    neither running nor finished and whose dependencies have all finished."""
    __tracebackhide__ = True
    depends_on = {t: list(deps) for t, deps in GRAPH.items()}
    cases = [((list(ORDER), depends_on, set(f), set(r)), expected, why) for (f, r), expected, why in READY_CASES]
    with _time_limit(timeout, "check_ready_tasks"):
        problems = _table(ready_tasks, cases, lambda i, args: f"ready_tasks(queue, depends_on, "
                                                              f"finished={sorted(args[2])}, running={sorted(args[3])})",
                          _judge_ready)
        problems = problems or _graph_run(ready_tasks)
    _report("check_ready_tasks", problems)


REQUEUE_CASES = (  # (lost, attempts, retries), (again, given_up), why
    ((["a"], {"a": 1}, 2), (["a"], []), "'a' died on its first attempt; retries=2 allows 2 more"),
    ((["a"], {"a": 3}, 2), ([], ["a"]), "'a' has been on 3 = retries + 1 engines that died: give it up"),
    ((["a"], {"a": 2}, 2), (["a"], []), "'a' died twice; with retries=2 it gets a third attempt"),
    ((["a", "b", "c"], {"a": 1, "b": 2, "c": 1}, 1), (["a", "c"], ["b"]),
     "with retries=1 a task gets 2 attempts: 'b' has had both"),
    ((["a"], {"a": 1}, 0), ([], ["a"]), "retries=0: one attempt, no retry"),
    ((["a", "b"], {"a": 2, "b": 2}, 1), ([], ["a", "b"]),
     "with retries=1 both have had their 2 attempts: give both up"),
    ((["a", "b", "c", "d"], {"a": 3, "b": 3, "c": 1, "d": 3}, 2), (["c"], ["a", "b", "d"]),
     "'a', 'b' and 'd' have had retries + 1 = 3 attempts; 'c' one"),
)


def _judge_requeue(args, got, expected, why):
    """What is wrong with requeue_lost(*args) = got: a task lost or in both lists, the first task in the wrong
    list and the rule (with the loop that skips a task after a remove), or the order. (`why` documents the
    case.)"""
    lost, attempts, retries = args
    if not (isinstance(got, tuple) and len(got) == 2):
        return "returned something that is not a pair: return (again, given_up), two lists"
    again, given_up = list(got[0]), list(got[1])
    shown = f"returned ({again}, {given_up})"
    missing = [t for t in lost if t not in again and t not in given_up]
    if missing:
        return f"{shown}: task {missing[0]!r} is in neither list, so it is lost"
    both = [t for t in lost if t in again and t in given_up]
    if both:
        return f"{shown}: task {both[0]!r} is in both lists"
    expected = (list(expected[0]), list(expected[1]))
    if (again, given_up) == expected:
        return None
    for t in again:
        if attempts[t] > retries:
            text = (f"{shown}, expected {tuple(expected)}: {t!r} has had attempts[{t!r}] = {attempts[t]} > retries "
                    f"= {retries}: it has been on {attempts[t]} engines that died, so it is given up")
            before = lost[lost.index(t) - 1] if lost.index(t) > 0 else None
            if before in given_up:
                text += (f"; it comes right after {before!r}, which you gave up: removing {before!r} from a list "
                         f"while a for loop walks over that list makes the loop skip the next task, {t!r}; build "
                         f"new lists instead (e.g. two list comprehensions over lost)")
            return text
    for t in given_up:
        if attempts[t] <= retries:
            return (f"{shown}, expected {tuple(expected)}: {t!r} has had attempts[{t!r}] = {attempts[t]} <= retries "
                    f"= {retries}, so it goes back to the queue")
    return f"{shown}, expected {tuple(expected)}: the right tasks in each list, but keep the order of lost"


def _dying_run(requeue_lost):
    """12 items on 4 engines, retries=1: item 5 kills its engine once, item 9 kills every engine it meets."""
    from .. import engine_scheduler
    from ..cluster import engine_cluster

    with tempfile.TemporaryDirectory() as folder, engine_cluster(4) as (_, client), \
            _in_place_of(engine_scheduler, "requeue_lost", requeue_lost):
        sched = engine_scheduler.EngineScheduler(client, retries=1)
        futures = [sched.submit(_square_or_die, i, folder, name=f"item {i}") for i in range(12)]
        try:
            sched.wait(timeout=30)
        except Exception as exc:
            return [f"a real EngineScheduler with your function (12 tasks on 4 engines, retries=1, 'item 5' kills its "
                    f"engine once, 'item 9' every time) failed: {type(exc).__name__}: {exc}"]
    run = "in a real run (12 tasks on 4 engines, retries=1, 'item 5' kills its engine once, 'item 9' every time)"
    for i, future in enumerate(futures):
        if i == 9:
            if future.exception() is None or "died on each of its 2 attempts" not in str(future.exception()):
                return [f"{run}, 'item 9' should have failed after 2 attempts, got: {future.exception()}"]
        elif future.exception() is not None:
            return [f"{run}, 'item {i}' failed: {future.exception()}"]
        elif future.result() != i * i:
            return [f"{run}, 'item {i}' gave {future.result()}, expected {i * i}"]
    return []


def _square_or_die(i, folder):
    import os
    import signal
    marker = os.path.join(folder, f"item {i} died")
    if i == 9 or (i == 5 and not os.path.exists(marker)):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return i * i


def _describe_requeue(i, args):
    return f"requeue_lost(lost={args[0]}, attempts={args[1]}, retries={args[2]})"


def _swapped(requeue_lost):
    """[the problem] if requeue_lost returns (given_up, again) in every case, else []. Taken case by case,
    a swap of one task's lists looks like the wrong rule, so the whole table decides."""
    for args, expected, _ in REQUEUE_CASES:
        got, error = _call(requeue_lost, *args)
        if error or not (isinstance(got, tuple) and len(got) == 2) or \
                (list(got[1]), list(got[0])) != (list(expected[0]), list(expected[1])):
            return []
    (args, expected, _), got = REQUEUE_CASES[0], requeue_lost(*REQUEUE_CASES[0][0])
    return [f"{_describe_requeue(0, args)} returned ({list(got[0])}, {list(got[1])}), expected {expected}: the two "
            f"lists are swapped (in all {len(REQUEUE_CASES)} cases); return (again, given_up), the tasks that go "
            f"back to the queue first"]


def check_requeue_lost(requeue_lost, timeout=TIMEOUT):
    """requeue_lost(lost, attempts, retries) must return (again, given_up): the lost tasks with
    attempts[task] <= retries go back to the queue, the others are given up; none lost, none in both."""
    __tracebackhide__ = True
    with _time_limit(timeout, "check_requeue_lost"):
        problems = _swapped(requeue_lost) or _table(requeue_lost, REQUEUE_CASES, _describe_requeue, _judge_requeue)
        problems = problems or _dying_run(requeue_lost)
    _report("check_requeue_lost", problems)

