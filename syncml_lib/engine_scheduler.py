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

1. Check the graph of the tasks not run yet: a dependency named in after= that is not a task of this
   scheduler, or a cycle, is a GraphError before anything runs. A future of another EngineScheduler is
   refused at submit (GraphError naming it): pass its result instead, `other.result()`.
2. The ready tasks are those whose dependencies have all finished. Order them by critical path: a task's
   priority is its cost plus the largest priority among the tasks that wait for it (the longest chain of
   work it still holds up), computed once per run from the tasks without dependents back to the first
   ones, O(tasks + dependencies) and no recursion; order="arrival" keeps the order of submission instead.
3. Every engine with a free place gets the first ready task (dynamic self-scheduling). per_engine=1, the
   default, sends an engine its next task after its reply; per_engine=2 keeps two tasks on each engine,
   one running and one to start as soon as it ends (a task that becomes ready meanwhile, perhaps the
   next link of the critical path, then waits behind one already sent).
4. Wait for the first attempt to end (each attempt is a concurrent.futures Future, the request's
   MessageFuture; its done-callback, run by the client's IO thread, puts it in a queue the loop blocks on):
   - it returned: keep its result (once); its dependents may become ready;
   - it raised: the task fails, and so does every task that depends on it, naming it (no retry: a bug
     raises again on another engine). Everything else still runs;
   - its engine died (ipyparallel's EngineError, which the engine's nanny reports at once): the engine is
     gone; the task goes back to the ready tasks, and after retries + 1 dead engines it fails by name
     (a task that was only waiting on that engine, per_engine > 1, goes back without using a retry).
     Which task killed an engine that held two (per_engine=2): not simply the first one sent to it. A
     task that had finished may have lost its reply: ipyparallel fails every task still out on an engine
     with an EngineError as soon as it hears of the death (`Client._handle_stranded_msgs`), a reply
     that comes later is dropped (the client has already forgotten the request), and a reply still in the
     engine's send buffer dies with it. So with two tasks per engine, the engine writes the attempt it is
     about to start into a file of this scheduler's (a temporary folder; one file per engine), and the
     master reads it when the engine dies: that attempt killed it and uses a retry; the ones sent before
     it had finished (their replies lost: they run again without using a retry) and the ones after it
     never started (same). This needs the engine on the master's machine; on another machine, or if
     there is no file, the first task sent is charged, and so it is when the file names no attempt still
     out (the engine died before the next one had started, perhaps unpacking its arguments).
5. Engines that register meanwhile (replacements) join the idle ones, and a retried task may go to any
   engine alive, one it has run on before included.

Cost: two messages per task through ipyparallel's controller (about a millisecond each way here). With
per_engine=1 an engine waits a round trip through this kernel between tasks, which dominates tiny tasks;
per_engine=2 sends each engine its next task while it runs one, so it starts it at once. What
per_engine=2 costs: a task can wait behind a long one on its engine while another engine is free, each
attempt writes a few bytes to a file before it starts (above), and a death is told apart exactly only
on the master's machine. On empty tasks the kernel, not the engines, limits the rate (README: the
engines benchmark): its main thread and the client's IO thread share one interpreter, and most of their
time per task is ipyparallel's own (building and sending the request, unpacking the reply). So the
master sends through _Sender (Client.send_apply_request and nothing more: no view, no AsyncResult), and
blocks on a queue that the attempts' done-callbacks fill, not on concurrent.futures.wait over every
attempt out. With that the default made 1.11x, 1.18x and 1.21x the load-balanced view's rate of empty
tasks in three runs in a row (README), although the view's own scheduler, another process, sends each
engine its next task without the round trip through the kernel that ours needs with per_engine=1: the
view's kernel side also builds an AsyncResult per task. per_engine=2 keeps the engines busy but is not
faster there (1.02x to 1.18x): the engines are not what is short. The master's work per step (one
pass of the loop in `run`) is O(engines) for a map: the engines, the attempts out, and the front of the queue
until every free place has a ready task; a finished task leaves the pending tasks, the queue (lazily)
and the tasks waited for in O(1). In a graph the queue's front can also hold tasks still waiting for
dependencies: the step passes over those too (ready_tasks is asked about a window of the queue at a
time: the free places plus the attempts out, doubling up to WINDOW). Checking
the graph and ordering it cost O(tasks + dependencies) once per call of run.

Ctrl-C (Kernel > Interrupt) aborts the tasks waiting on the engines, sends SIGINT to the engines running
tasks, waits for them (5 s at most),
marks the unfinished tasks cancelled and raises KeyboardInterrupt saying how far it got; the engines
stay usable.
"""
import concurrent.futures
import itertools
import os
import queue
import signal
import socket
import tempfile
import time

__all__ = ["EngineScheduler", "TaskFuture", "TaskFailed", "GraphError", "ORDERS", "ready_tasks", "requeue_lost"]

ORDERS = ("critical path", "arrival")


class TaskFailed(Exception):
    """A task raised, killed too many engines, depends on a task that failed, or was cancelled."""


class GraphError(ValueError):
    """The task graph cannot run: a dependency that is not a task of this scheduler (a future of another
    scheduler is refused at submit), or a cycle."""


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


def _timed(call):
    """Runs on an engine: call = (fn, args, mark); fn(*args) and when it started and ended (time.time(),
    one clock per machine). mark=(path, attempt): first write the attempt into the file at path (the
    master reads it if the engine dies: EngineScheduler._lose_engine). One argument, not three: ipyparallel
    pickles each argument of an apply on its own, and this one is sent once per attempt."""
    import time
    fn, args, mark = call
    if mark is not None:
        with open(mark[0], "w") as out:
            out.write(mark[1])
    start = time.time()
    result = fn(*args)
    return result, start, time.time()


class _Sender:
    """Sends one engine of an ipyparallel Client its tasks: Client.send_apply_request, what
    engine_view.apply_async(f, *args) does underneath (DirectView._really_apply), and no more. It returns
    the request's MessageFuture, a concurrent.futures Future whose result the client's IO thread sets to
    the task's return value or to the exception it stored (RemoteError; EngineError when the engine died:
    Client._handle_stranded_msgs), and which the client forgets by itself once it is done. The view would
    also wrap it in an AsyncResult and sync its history and outstanding set on every call: more objects
    and locks per task in this kernel, which limits the rate of tiny tasks (README, the engines benchmark).
    An engine the client no longer knows (it died while idle) raises IndexError, as the view does."""

    def __init__(self, client, engine):
        self.client, self.engine = client, engine

    def apply_async(self, f, *args):
        idents, _ = self.client._build_targets(self.engine)
        return self.client.send_apply_request(self.client._mux_stream, f, args, ident=idents[0])


def _whoami():
    import os
    import socket
    return os.getpid(), socket.gethostname()


def _is_ipyparallel(client):
    import ipyparallel
    return isinstance(client, ipyparallel.Client)


def _engine_died(error):
    return isinstance(error, BaseException) and getattr(error, "ename", None) == "EngineError"


# ----------------------------------------------------------------------------- the two rules of the master
# Small functions the master calls by name, so that the chapter's exercises can put a learner's version in
# their place (checks/engines.py does) and run the real scheduler with it.

def ready_tasks(queue, depends_on, finished, running):
    """The tasks of `queue` (in hand-out order) that can start now: not running, not finished, and every
    task in depends_on[task] finished. Keeps the queue's order."""
    return [t for t in queue if t not in running and t not in finished and all(d in finished for d in depends_on[t])]


def requeue_lost(lost, attempts, retries):
    """The engine running the tasks `lost` died. Returns (again, given_up): the lost tasks that go back to
    the queue, because they have not yet used up their retries (attempts[task] <= retries), and those
    given up (attempts[task] == retries + 1: they were on as many engines that died). Every lost task is
    in exactly one of the two lists, in the order of `lost`."""
    again = [t for t in lost if attempts[t] <= retries]
    given_up = [t for t in lost if attempts[t] > retries]
    return again, given_up


class EngineScheduler:
    """Dynamic self-scheduling of tasks and task graphs over the engines of an ipyparallel Client."""

    WINDOW = 64  # tasks of the queue looked at together when looking for ready ones

    def __init__(self, client, retries=2, order="critical path", engine_wait=5.0, per_engine=1):
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; valid orders are {', '.join(map(repr, ORDERS))}")
        if not isinstance(per_engine, int) or per_engine < 1:
            raise ValueError(f"per_engine must be an integer >= 1, got {per_engine!r}")
        self.client, self.retries, self.order, self.engine_wait = client, retries, order, engine_wait
        self.per_engine = per_engine  # tasks sent to an engine at once: it runs one, the others wait there
        self.pending = {}             # submitted, not finished, in submission order (a dict: removal in O(1))
        self.queue = []               # the pending tasks of the graph that runs, in hand-out order (below)
        self.dependents = {}          # pending task -> the pending tasks that depend on it (_check_graph)
        self.running = {}             # attempt (a Future: _Sender) -> (task, engine, start time)
        self.replies = queue.SimpleQueue()  # attempts that have ended, put by the client's IO thread
        self.marks = {}               # attempt -> the attempt's name in the engine's file (per_engine > 1)
        self._folder = None           # where the engines write the attempt they start (per_engine > 1)
        self.engines = {}             # engine id -> (pid, hostname), the live ones this scheduler knows
        self.views = {}               # engine id -> what sends it tasks (_Sender; for a client that is
                                      # not ipyparallel's, the fake in the tests, client[engine])
        self.tasks = {}               # name -> TaskFuture, every task submitted with a name
        self.records = []             # one row per attempt
        self.dead = []                # ids of the engines seen dying
        self.finished = set()         # the tasks that have finished (done or failed)
        self.requeued = []            # names of the tasks put back in the queue after their engine died
        self.t0 = time.time()
        self._names = itertools.count()
        # A finished task stays in the queue until the front passes it (_head) or the queue is compacted,
        # once half of it is finished tasks (_stale of them): O(1) per task, amortized.
        self._in_queue, self._head, self._stale = set(), 0, 0
        self._just_finished = []      # tasks finished since the loop last looked (for the tasks it waits for)

    # ------------------------------------------------------------------ submitting

    def submit(self, fn, *args, after=(), name=None, cost=1.0):
        """A TaskFuture for fn(*args) on some engine, once every future in `after` and among `args` has
        finished (a future among args is replaced by its result). cost: an estimate in any unit, for the
        critical-path order. Nothing runs until something waits (result, wait, map). A future of another
        EngineScheduler, among args or in after=, is refused (GraphError): that scheduler's loop, not this
        one, would run it; pass its result, future.result(), instead."""
        if name is not None and name in self.tasks:
            raise ValueError(f"there is a task named {name!r} already")
        task = self._new_task(fn, args, after, name if name is not None else f"task {next(self._names)}", cost)
        if name is not None:
            self.tasks[name] = task  # only named tasks can be named in after=
        return task

    def _new_task(self, fn, args, after, name, cost):
        if not callable(fn):
            raise TypeError(f"a task needs a function, got {type(fn).__name__}")
        after = [after] if isinstance(after, (str, TaskFuture)) else list(after)
        for dep in list(args) + after:
            if isinstance(dep, TaskFuture) and dep.scheduler is not self:
                raise GraphError(f"task {name!r} depends on {dep.name!r}, a task of another EngineScheduler; "
                                 f"nothing was submitted. Pass its result instead ({dep.name!r}'s "
                                 f"future.result()), or submit both tasks to one scheduler")
        task = TaskFuture(self, name, fn, args, after, cost)
        self.pending[task] = None
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
        self._just_finished = []
        try:
            self._check_graph()
        except GraphError as error:  # the graph never runs; the scheduler stays usable for the next one
            self._fail_everything_left(str(error))
            raise
        for task in list(self.pending):  # submitted after a task they depend on had failed
            failed = [d for d in task.depends_on if d._error is not None]
            if failed:
                self._finish(task, error=TaskFailed(f"task {task.name!r} not run: it depends on "
                                                    f"{failed[0].name!r}, which failed"))
        # the order in which ready tasks are handed out; priorities are fixed while the graph runs (a task's
        # dependents all finish after it), so the queue is sorted once (stable: ties keep arrival order)
        self.queue = list(self.pending)
        self._in_queue, self._head, self._stale = set(self.queue), 0, 0
        if self.order == "critical path":
            priority = self.priorities(checked=True)
            self.queue.sort(key=lambda t: -priority[t])
        left = {t for t in wanted if not t.done()}  # the tasks waited for and not finished: O(1) per finish
        deadline = None if timeout is None else time.monotonic() + timeout
        no_engine_since = None
        try:
            while left:
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
                    self._collect(self._ended_attempts(timeout=0.5))
                left.difference_update(self._just_finished)
                self._just_finished.clear()
                if deadline is not None and time.monotonic() > deadline and left:
                    raise TimeoutError(f"{len(left)} tasks not finished after {timeout} s")
        except KeyboardInterrupt:
            self._interrupted()

    def _ended_attempts(self, timeout):
        """The AsyncResults that have ended since the last call: one blocking get on self.replies (each
        attempt's done-callback puts it there; timeout in seconds), then whatever else is there already.
        O(1) per attempt, whatever the number of engines; an attempt already handled (its engine died, or
        the run was interrupted) is skipped by _collect."""
        try:
            ended = [self.replies.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.replies.empty():
            ended.append(self.replies.get())
        return ended

    def _check_graph(self):
        """Step 1: every dependency is a task of this scheduler, and there is no cycle. Also lists each
        pending task's pending dependents (self.dependents). O(tasks + dependencies)."""
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
        self.dependents = {t: [] for t in self.pending}
        for t in self.pending:
            for d in t.depends_on:
                if d in self.dependents:
                    self.dependents[d].append(t)

    def _join_new_engines(self):
        """Step 5: engines the client knows and we do not (at the start, and replacements) join."""
        asked = {}  # every new engine is asked at once, then the answers are read: one round trip in all
        for engine in set(self.client.ids) - set(self.engines) - set(self.dead):
            try:  # client[engine] too: the client's IO thread may have unregistered it since client.ids
                view = self.client[engine]
                view.use_cloudpickle()
                asked[engine] = (view, view.apply_async(_whoami))
            except Exception:
                self.dead.append(engine)  # it died while joining
        for engine, (view, whoami) in sorted(asked.items()):
            try:
                self.engines[engine] = whoami.result(timeout=10)
                self.views[engine] = _Sender(self.client, engine) if _is_ipyparallel(self.client) else view
            except Exception:
                self.dead.append(engine)  # it died while joining

    def priorities(self, checked=False):
        """Each pending task's critical-path priority: its cost plus the largest priority of its dependents.
        Without recursion: a task's priority is computed once all its dependents' are, starting from the
        tasks nothing depends on (Kahn's order, backwards); O(tasks + dependencies)."""
        if not checked:
            self._check_graph()
        waiting = {t: len(self.dependents[t]) for t in self.pending}  # dependents whose priority is not known
        order = [t for t in self.pending if waiting[t] == 0]
        priority = {}
        for task in order:                   # the list grows while it is read
            priority[task] = task.cost + max((priority[d] for d in self.dependents[task]), default=0.0)
            for dep in task.depends_on:
                if dep in waiting:
                    waiting[dep] -= 1
                    if waiting[dep] == 0:
                        order.append(dep)
        return priority

    def _hand_out(self):
        """Steps 2 and 3: each idle engine gets the next ready task of the queue (with self.per_engine > 1, up to
        that many each, first one for every engine). ready_tasks is asked about the queue a window at a time,
        from its first unfinished task, only until every free place has a task (a long map stays cheap): the
        first window as long as the free places plus the attempts out (in a map those come first), each next
        one twice as long, up to WINDOW."""
        held = {engine: 0 for engine in self.engines}
        for _, engine, _ in self.running.values():
            held[engine] += 1
        places = [engine for depth in range(self.per_engine) for engine in sorted(held) if held[engine] <= depth]
        if not places:
            return
        running = {task for task, _, _ in self.running.values()}
        while self._head < len(self.queue) and self.queue[self._head].done():
            self._head += 1
        ready, i = [], self._head
        size = min(len(places) + len(running), self.WINDOW)  # the running tasks may come first in the queue
        while i < len(self.queue) and len(ready) < len(places):
            window = self.queue[i:i + size]
            ready += ready_tasks(window, {t: t.depends_on for t in window}, self.finished, running)
            i, size = i + size, min(2 * size, self.WINDOW)
        for task, engine in zip(ready, places):
            if engine not in self.engines:  # found dead below, at an earlier place of this step
                continue
            args = tuple(a._result if isinstance(a, TaskFuture) else a for a in task.args)
            task.attempts += 1
            mark = None
            if self.per_engine > 1:
                if self._folder is None:  # removed when the scheduler is (TemporaryDirectory's finalizer)
                    self._folder = tempfile.TemporaryDirectory(prefix="syncml-attempts-")
                mark = (os.path.join(self._folder.name, f"engine {engine}"), f"{task.name}#{task.attempts}")
            try:
                ar = self.views[engine].apply_async(_timed, (task.fn, args, mark))
            except IndexError:  # "No such engine": it died while it held no task of ours (no EngineError)
                task.attempts -= 1
                self._lose_engine(engine)
                continue
            self.running[ar] = (task, engine, time.time())
            ar.add_done_callback(self.replies.put)  # called by the IO thread once the reply is unpacked
            if mark is not None:
                self.marks[ar] = mark[1]

    def _collect(self, finished):
        """Step 4: what the attempts that ended say."""
        for ar in finished:
            if ar not in self.running:  # already handled with the other tasks of its dead engine
                continue
            task, engine, sent = self.running[ar]
            reply = ar.result()  # the value, or the exception the client stored (not raised: _Sender)
            if _engine_died(reply):
                self._lose_engine(engine)
                continue
            del self.running[ar]
            self.marks.pop(ar, None)
            self._ended(task, engine, sent, reply)

    def _ended(self, task, engine, sent, reply):
        """An attempt replied: (result, start, end) from _timed, or the exception the task raised."""
        if isinstance(reply, BaseException):
            self._record(task, engine, sent - self.t0, time.time() - self.t0, "raised")
            self._finish(task, error=TaskFailed(f"task {task.name!r} failed on engine {engine}: "
                                                f"{getattr(reply, 'ename', type(reply).__name__)}: "
                                                f"{getattr(reply, 'evalue', reply)}"))
        else:
            result, start, end = reply
            self._record(task, engine, start - self.t0, end - self.t0, "done")
            self._finish(task, result=result)

    def _record(self, task, engine, start, end, outcome):
        self.records.append(dict(task=task.name, engine=engine, attempt=task.attempts, start=start, end=end,
                                 outcome=outcome))

    def _lose_engine(self, engine):
        """The engine is gone; its attempts still out leave self.running. The one it was running used a
        retry (_killer); the others run again without using one."""
        pid_host = self.engines.pop(engine, None)
        self.dead.append(engine)
        held = [(ar, task, sent) for ar, (task, where, sent) in self.running.items() if where == engine]
        for ar, _, _ in held:
            del self.running[ar]
        killer = self._killer(engine, pid_host, held) if held else None
        for ar, task, sent in held:
            self.marks.pop(ar, None)
            if task is killer:
                task.engines_killed.append(engine)
                self._record(task, engine, sent - self.t0, time.time() - self.t0, "engine died")
            else:
                task.attempts -= 1  # finished with its reply lost, or never started
        if killer is not None:
            self._requeue([killer])

    def _killer(self, engine, pid_host, held):
        """The task whose attempt killed the engine. One attempt out: that one. Several: the one the engine
        wrote into its file before starting it (module docstring, step 4), if the engine ran on this machine
        and the file names an attempt still out; else the first one sent (it was running, or about to)."""
        if len(held) == 1:
            return held[0][1]
        path = os.path.join(self._folder.name, f"engine {engine}") if self._folder else None
        if pid_host is not None and pid_host[1] == socket.gethostname() and path and os.path.exists(path):
            with open(path) as written:
                started = written.read()
            os.remove(path)
            return next((task for ar, task, _ in held if self.marks.get(ar) == started), held[0][1])
        return held[0][1]

    def _requeue(self, lost):
        """The tasks of a dead engine: back to the queue (they were never removed from it), or given up."""
        again, given_up = requeue_lost(lost, {t: t.attempts for t in lost}, self.retries)
        for task in given_up:
            self._finish(task, error=TaskFailed(
                f"task {task.name!r} failed: its engine died on each of its {task.attempts} attempts "
                f"(engines {task.engines_killed}; retries={self.retries})"))
        self.requeued.extend(t.name for t in again)
        missing = [t.name for t in lost if t not in again and t not in given_up]
        if missing:
            raise RuntimeError(f"requeue_lost dropped {missing}: neither run again nor given up")

    def _finish(self, task, result=None, error=None):
        """The task is over; if it failed, so are the tasks waiting for it, naming it (a loop over
        self.dependents, no recursion). O(1) per task, plus its dependents when it failed."""
        todo = [(task, result, error)]
        while todo:
            task, result, error = todo.pop()
            if task.done():
                continue
            task._finish(result, error)
            self.finished.add(task)
            self.pending.pop(task, None)
            self._just_finished.append(task)
            if task in self._in_queue:
                self._in_queue.discard(task)
                self._stale += 1
                if self._stale > len(self.queue) // 2:  # compact: the queue keeps its order
                    self.queue = [t for t in self.queue if not t.done()]
                    self._head, self._stale = 0, 0
            if error is not None:
                todo.extend((other, None, TaskFailed(f"task {other.name!r} not run: it depends on "
                                                     f"{task.name!r}, which failed"))
                            for other in self.dependents.get(task, ()) if not other.done())

    def _fail_everything_left(self, why):
        for task in list(self.pending):
            self._finish(task, error=TaskFailed(f"task {task.name!r} not run: {why}"))

    def _interrupted(self):
        """Ctrl-C: abort the attempts waiting behind a running one (per_engine > 1: else the engine would
        start them once interrupted), interrupt the engines running our tasks, wait for them, cancel the
        rest, say so."""
        here = socket.gethostname()
        by_engine = {}
        for ar, (_, engine, _) in self.running.items():
            by_engine.setdefault(engine, []).append(ar)
        for engine, ars in by_engine.items():
            if len(ars) > 1 and engine in self.engines:
                try:
                    self.client.abort(jobs=[ar.msg_id for ar in ars[1:]], targets=[engine], block=True)
                except Exception:
                    pass  # the engine died meanwhile: nothing waits there any more
        for task, engine, _ in list(self.running.values()):
            pid, host = self.engines.get(engine, (None, None))
            if pid and host == here:
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        concurrent.futures.wait(list(self.running), timeout=5)
        self.running.clear()
        self.marks.clear()
        done = sum(row["outcome"] == "done" for row in self.records)
        left = len(self.pending)
        self._fail_everything_left("cancelled by an interrupt")
        raise KeyboardInterrupt(f"interrupted: {done} tasks had finished, {left} were cancelled; "
                                f"the engines are free again")
