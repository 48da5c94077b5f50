"""A master in the notebook's kernel that hands tasks to plain ipyparallel engines, which can really die.

    sched = EngineScheduler(client, retries=2)
    sched.map(square, range(100))                     # [0, 1, 4, ...]: in item order
    data = sched.submit(load, 3, name="load 3")       # a TaskFuture; nothing runs yet
    model = sched.submit(train, data, name="train")   # a future among the arguments: its result, and a dependency
    report = sched.submit(publish, after=[model])     # after=: a dependency whose result is not needed
    sched.submit(evaluate, after=["train"])           # ... given as a future or by the task's name
    report.result(timeout=60)                         # runs everything submitted so far, then answers
    sched.records                                     # one row per attempt: task, engine, attempt, start, end, outcome

The master is the loop in `run` (called by map, result and wait), one step at a time:

1. Check the graph of the tasks not run yet: a dependency that is not a task of this scheduler, or a
   cycle, is a GraphError before anything runs.
2. The ready tasks are those whose dependencies have all finished. Order them by critical path: a task's
   priority is its cost plus the largest priority among the tasks that wait for it (the longest chain of
   work it still holds up); order="arrival" keeps the order of submission instead.
3. Every idle engine gets the first ready task (dynamic self-scheduling, one task per engine at a time).
4. Wait for the first attempt to end (ipyparallel's AsyncResults are concurrent.futures Futures):
   - it returned: keep its result (once); its dependents may become ready;
   - it raised: the task fails, and so does every task that depends on it, naming it (no retry: a bug
     raises again on another engine). Everything else still runs;
   - its engine died (ipyparallel's EngineError, which the engine's nanny reports at once): the engine is
     gone; the task goes back to the ready tasks, and after retries + 1 dead engines it fails by name.
5. Engines that register meanwhile (replacements) join the idle ones, and a retried task may go to any
   engine alive, one it has run on before included.

Cost: two messages per task through ipyparallel's controller (about a millisecond each way here), one
task per engine at a time, so tiny tasks are dominated by the round trip; the master's work per step is
O(ready tasks). Ctrl-C (Kernel > Interrupt) sends SIGINT to the engines running tasks, waits for them
(5 s at most), marks the unfinished tasks cancelled and raises KeyboardInterrupt saying how far it got;
the engines stay usable.
"""
import concurrent.futures
import itertools
import os
import signal
import socket
import time

__all__ = ["EngineScheduler", "TaskFuture", "TaskFailed", "GraphError", "ORDERS"]

ORDERS = ("critical path", "arrival")


class TaskFailed(Exception):
    """A task raised, killed too many engines, depends on a task that failed, or was cancelled."""


class GraphError(ValueError):
    """The task graph cannot run: a dependency that is not a task of this scheduler, or a cycle."""


class TaskFuture:
    """One task: like concurrent.futures.Future (done, result(timeout), exception(timeout)), except that
    waiting on it runs the scheduler's loop, which lives in this process."""

    def __init__(self, scheduler, name, fn, args, after, cost):
        self.scheduler, self.name, self.fn, self.args, self.cost = scheduler, name, fn, args, cost
        self.after = list(after)  # futures or task names; resolved into depends_on before the graph runs
        self.depends_on = [a for a in args if isinstance(a, TaskFuture)]
        self.attempts, self.engines_killed = 0, []
        self._done, self._result, self._error = False, None, None

    def done(self):
        return self._done

    def result(self, timeout=None):
        self.scheduler.run([self], timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self, timeout=None):
        self.scheduler.run([self], timeout)
        return self._error

    def _finish(self, result=None, error=None):
        self._done, self._result, self._error = True, result, error

    def __repr__(self):
        state = "pending" if not self._done else "failed" if self._error else "done"
        return f"<TaskFuture {self.name!r} {state}>"


def _timed(fn, args):
    """Runs on an engine: fn(*args) and when it started and ended (time.time(), one clock per machine)."""
    import time
    start = time.time()
    result = fn(*args)
    return result, start, time.time()


def _whoami():
    import os
    import socket
    return os.getpid(), socket.gethostname()


def _engine_died(error):
    return getattr(error, "ename", None) == "EngineError"


class EngineScheduler:
    """Dynamic self-scheduling of tasks and task graphs over the engines of an ipyparallel Client."""

    def __init__(self, client, retries=2, order="critical path", engine_wait=5.0):
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; valid orders are {', '.join(map(repr, ORDERS))}")
        self.client, self.retries, self.order, self.engine_wait = client, retries, order, engine_wait
        self.pending = []             # submitted, not finished, in submission order
        self.queue = []               # the pending tasks of the graph that runs, in hand-out order
        self.running = {}             # AsyncResult -> (task, engine, start time)
        self.engines = {}             # engine id -> (pid, hostname), the live ones this scheduler knows
        self.views = {}               # engine id -> a DirectView of that engine alone
        self.tasks = {}               # name -> TaskFuture, every task submitted with a name
        self.records = []             # one row per attempt
        self.dead = []                # ids of the engines seen dying
        self.t0 = time.time()
        self._names = itertools.count()

    # ------------------------------------------------------------------ submitting

    def submit(self, fn, *args, after=(), name=None, cost=1.0):
        """A TaskFuture for fn(*args) on some engine, once every future in `after` and among `args` has
        finished (a future among args is replaced by its result). cost: an estimate in any unit, for the
        critical-path order. Nothing runs until something waits (result, wait, map)."""
        if name is not None and name in self.tasks:
            raise ValueError(f"there is a task named {name!r} already")
        task = self._new_task(fn, args, after, name if name is not None else f"task {next(self._names)}", cost)
        if name is not None:
            self.tasks[name] = task  # only named tasks can be named in after=
        return task

    def _new_task(self, fn, args, after, name, cost):
        if not callable(fn):
            raise TypeError(f"a task needs a function, got {type(fn).__name__}")
        task = TaskFuture(self, name, fn, args, [after] if isinstance(after, (str, TaskFuture)) else after, cost)
        self.pending.append(task)
        return task

    def map(self, fn, items, timeout=None):
        """[fn(item) for item in items], run over the engines; results in item order. If tasks failed, the
        others still finish, then TaskFailed names the first failed item."""
        tasks = [self._new_task(fn, (item,), (), f"item {i}", 1.0) for i, item in enumerate(items)]
        self.run(tasks, timeout)
        failed = [t for t in tasks if t._error is not None]
        if failed:
            raise TaskFailed(f"{len(failed)} of {len(tasks)} items failed; {failed[0]._error}")
        return [t._result for t in tasks]

    def wait(self, timeout=None):
        """Run everything submitted so far."""
        self.run(list(self.pending), timeout)

    # ------------------------------------------------------------------ the master's loop

    def run(self, wanted, timeout=None):
        """Run the loop until every task in `wanted` has finished (TimeoutError after `timeout` seconds)."""
        try:
            self._check_graph()
        except GraphError as error:  # the graph never runs; the scheduler stays usable for the next one
            self._fail_everything_left(str(error))
            raise
        # the order in which ready tasks are handed out; priorities are fixed while the graph runs (a task's
        # dependents all finish after it), so the queue is sorted once (stable: ties keep arrival order)
        for task in list(self.pending):  # submitted after a task they depend on had failed
            failed = [d for d in task.depends_on if d._error is not None]
            if failed:
                self._finish(task, error=TaskFailed(f"task {task.name!r} not run: it depends on "
                                                    f"{failed[0].name!r}, which failed"))
        self.queue = list(self.pending)
        if self.order == "critical path":
            priority = self.priorities()
            self.queue.sort(key=lambda t: -priority[t])
        deadline = None if timeout is None else time.monotonic() + timeout
        no_engine_since = None
        try:
            while any(not t.done() for t in wanted):
                self._join_new_engines()
                self._hand_out()
                if not self.running:
                    if self.engines:
                        raise RuntimeError("nothing is running and nothing is ready: a bug in the scheduler")
                    no_engine_since = no_engine_since or time.monotonic()
                    if time.monotonic() - no_engine_since > self.engine_wait:
                        self._fail_everything_left(f"no engine left alive (waited {self.engine_wait:.0f} s for one)")
                    time.sleep(0.05)
                else:
                    no_engine_since = None
                    self._collect(concurrent.futures.wait(list(self.running), timeout=0.5,
                                                          return_when=concurrent.futures.FIRST_COMPLETED).done)
                if deadline is not None and time.monotonic() > deadline and any(not t.done() for t in wanted):
                    raise TimeoutError(f"{sum(not t.done() for t in wanted)} tasks not finished after {timeout} s")
        except KeyboardInterrupt:
            self._interrupted()

    def _check_graph(self):
        """Step 1: every dependency is a task of this scheduler, and there is no cycle."""
        for task in self.pending:
            for dep in task.after:
                known = self.tasks.get(dep) if isinstance(dep, str) else dep
                if not isinstance(known, TaskFuture) or known.scheduler is not self:
                    raise GraphError(f"task {task.name!r} depends on {dep!r}, which is not a task of this "
                                     f"scheduler; nothing was run")
                if known not in task.depends_on:
                    task.depends_on.append(known)
        state = {}  # task -> "visiting" (on the current path) or "finished" (depth-first search)
        for task in self.pending:
            if task in state:
                continue
            state[task], stack = "visiting", [(task, iter(task.depends_on))]
            while stack:
                node, deps = stack[-1]
                dep = next(deps, None)
                if dep is None:
                    state[node] = "finished"
                    stack.pop()
                elif state.get(dep) == "visiting":
                    path = [n for n, _ in stack]
                    cycle = [n.name for n in path[path.index(dep):]] + [dep.name]
                    raise GraphError(f"the tasks form a cycle: {' -> '.join(map(repr, cycle))} "
                                     f"(each depends on the next); nothing was run")
                elif dep not in state and not dep.done():
                    state[dep] = "visiting"
                    stack.append((dep, iter(dep.depends_on)))

    def _join_new_engines(self):
        """Step 5: engines the client knows and we do not (at the start, and replacements) join."""
        for engine in set(self.client.ids) - set(self.engines) - set(self.dead):
            view = self.client[engine]
            view.use_cloudpickle()
            try:
                self.engines[engine] = view.apply_async(_whoami).get(timeout=10)
                self.views[engine] = view
            except Exception:
                self.dead.append(engine)  # it died while joining

    def priorities(self):
        """Each pending task's critical-path priority: its cost plus the largest priority of its dependents."""
        self._check_graph()
        dependents = {t: [] for t in self.pending}
        for t in self.pending:
            for d in t.depends_on:
                if d in dependents:
                    dependents[d].append(t)
        priority = {}

        def of(task):
            if task not in priority:
                priority[task] = task.cost + max((of(d) for d in dependents[task]), default=0.0)
            return priority[task]
        for t in self.pending:
            of(t)
        return priority

    def _hand_out(self):
        """Steps 2 and 3: each idle engine gets the first ready task of the queue."""
        busy = {engine for _, engine, _ in self.running.values()}
        idle = sorted(set(self.engines) - busy)
        if not idle:
            return
        running = {task for task, _, _ in self.running.values()}
        for task in self.queue:
            if task in running or not all(d.done() for d in task.depends_on):
                continue
            engine = idle.pop(0)
            args = tuple(a._result if isinstance(a, TaskFuture) else a for a in task.args)
            task.attempts += 1
            self.running[self.views[engine].apply_async(_timed, task.fn, args)] = (task, engine, time.time())
            if not idle:
                return

    def _collect(self, finished):
        """Step 4: what the attempts that ended say."""
        for ar in finished:
            task, engine, sent = self.running.pop(ar)
            row = dict(task=task.name, engine=engine, attempt=task.attempts)
            try:
                result, start, end = ar.get()
            except Exception as error:
                if _engine_died(error):
                    self.engines.pop(engine, None)
                    self.dead.append(engine)
                    task.engines_killed.append(engine)
                    self.records.append(dict(row, start=sent - self.t0, end=time.time() - self.t0, outcome="engine died"))
                    if task.attempts > self.retries:
                        self._finish(task, error=TaskFailed(
                            f"task {task.name!r} failed: its engine died on each of its {task.attempts} attempts "
                            f"(engines {task.engines_killed}; retries={self.retries})"))
                    continue  # else: ready again
                self.records.append(dict(row, start=sent - self.t0, end=time.time() - self.t0, outcome="raised"))
                self._finish(task, error=TaskFailed(f"task {task.name!r} failed on engine {engine}: "
                                                    f"{getattr(error, 'ename', type(error).__name__)}: "
                                                    f"{getattr(error, 'evalue', error)}"))
                continue
            self.records.append(dict(row, start=start - self.t0, end=end - self.t0, outcome="done"))
            self._finish(task, result=result)

    def _finish(self, task, result=None, error=None):
        """The task is over; if it failed, so are the tasks waiting for it, naming it."""
        if task.done():
            return
        task._finish(result, error)
        self.pending.remove(task)
        if task in self.queue:
            self.queue.remove(task)
        if error is not None:
            for other in list(self.pending):
                if task in other.depends_on:
                    self._finish(other, error=TaskFailed(f"task {other.name!r} not run: it depends on "
                                                         f"{task.name!r}, which failed"))

    def _fail_everything_left(self, why):
        for task in list(self.pending):
            self._finish(task, error=TaskFailed(f"task {task.name!r} not run: {why}"))

    def _interrupted(self):
        """Ctrl-C: interrupt the engines running our tasks, wait for them, cancel the rest, say so."""
        here = socket.gethostname()
        for task, engine, _ in list(self.running.values()):
            pid, host = self.engines.get(engine, (None, None))
            if pid and host == here:
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        concurrent.futures.wait(list(self.running), timeout=5)
        self.running.clear()
        done = sum(row["outcome"] == "done" for row in self.records)
        left = len(self.pending)
        self._fail_everything_left("cancelled by an interrupt")
        raise KeyboardInterrupt(f"interrupted: {done} tasks had finished, {left} were cancelled; "
                                f"the engines are free again")
