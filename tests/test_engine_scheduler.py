"""EngineScheduler on real plain ipyparallel engines: engines SIGKILLed mid-task lose no task and duplicate
none, a poisoned task is given up by name, task graphs run in dependency order, bad graphs never start,
a retry goes to a replacement engine at once. The master's bookkeeping (which task killed an engine whose
replies arrive late, the work per step, long chains) is tested on FakeClient, engines that are threads of
this process and whose replies arrive when the test says."""
import concurrent.futures
import itertools
import os
import queue
import random
import signal
import threading
import time

import pytest

from syncml_lib.cluster import engine_cluster
from syncml_lib import engine_scheduler
from syncml_lib.engine_scheduler import EngineScheduler, GraphError, TaskFailed, TaskFuture
from helpers import descendants, still_alive_after

pytestmark = pytest.mark.timeout(120)


def square_dying_once_at(marker_dir, die_at):
    """fn(item): item squared; the first engine to run item `die_at` is SIGKILLed in the middle of it."""
    def fn(item):
        import os
        import signal
        import time
        time.sleep(0.01)
        if item == die_at:
            try:
                os.close(os.open(os.path.join(marker_dir, "died"), os.O_CREAT | os.O_EXCL))
                os.kill(os.getpid(), signal.SIGKILL)
            except FileExistsError:
                pass
        return item * item
    return fn


def dies_on_first_attempts(marker_dir, deaths):
    """fn(): SIGKILLs its engine on its first `deaths` runs, then returns 'survived'."""
    def fn():
        import os
        import signal
        runs = len(os.listdir(marker_dir))
        open(os.path.join(marker_dir, f"run{runs}"), "w").close()
        if runs < deaths:
            os.kill(os.getpid(), signal.SIGKILL)
        return "survived"
    return fn


@pytest.fixture(scope="module")
def two_engines():
    """Two engines for the tests that kill none."""
    with engine_cluster(2) as (cluster, client):
        yield client


def done_rows(records):
    return [row for row in records if row["outcome"] == "done"]


@pytest.mark.parametrize("engines, per_engine", [(2, 1), (4, 1), (3, 2)])
def test_an_engine_killed_mid_map_loses_no_task_and_duplicates_none(engines, per_engine, tmp_path):
    before = set(descendants())
    with engine_cluster(engines) as (cluster, client):
        started = set(descendants()) - before
        sched = EngineScheduler(client, retries=2, per_engine=per_engine)
        assert sched.map(square_dying_once_at(str(tmp_path), 13), range(40)) == [i * i for i in range(40)]
        done = done_rows(sched.records)
        assert sorted(row["task"] for row in done) == sorted(f"item {i}" for i in range(40))  # each once
        died = [row for row in sched.records if row["outcome"] == "engine died"]
        assert [row["task"] for row in died] == ["item 13"] and len(sched.dead) == 1
        rerun = [row for row in done if row["task"] == "item 13"]
        assert rerun[0]["attempt"] == 2 and rerun[0]["engine"] != died[0]["engine"]
        # a task waiting behind item 13 on its engine (per_engine=2) never started: no retry used, no blame
        assert all(row["attempt"] == 1 for row in done if row["task"] != "item 13"), done
        assert sched.requeued == ["item 13"]
        assert sorted(client.ids) == sorted(set(range(engines)) - set(sched.dead))
    assert still_alive_after(started) == []


def test_a_task_that_kills_every_engine_is_given_up_by_name_after_retries_plus_one(tmp_path):
    with engine_cluster(4) as (cluster, client):
        sched = EngineScheduler(client, retries=2)
        poison = sched.submit(dies_on_first_attempts(str(tmp_path), 99), name="poison")
        others = [sched.submit(pow, i, 2) for i in range(12)]
        sched.wait(timeout=60)
        with pytest.raises(TaskFailed, match=r"task 'poison' failed: its engine died on each of its 3 attempts "
                                             r"\(engines \[\d, \d, \d\]; retries=2\)"):
            poison.result()
        assert [f.result() for f in others] == [i * i for i in range(12)]
        assert len(sched.dead) == 3 and len(client.ids) == 1


def random_dag(nodes, edges, seed):
    """Edges (parent, child) with parent < child: a DAG, like ipyparallel's dagdeps example."""
    rng = random.Random(seed)
    pairs = set()
    while len(pairs) < edges:
        a, b = sorted(rng.sample(range(nodes), 2))
        pairs.add((a, b))
    return sorted(pairs)


def nap(seconds):
    import time
    time.sleep(seconds)
    return seconds


def test_a_task_graph_starts_each_task_after_all_its_dependencies_ended(two_engines):
    edges = random_dag(32, 128, seed=7)
    rng = random.Random(1)
    sched = EngineScheduler(two_engines)
    tasks = {}
    for node in range(32):
        tasks[node] = sched.submit(nap, rng.uniform(0.005, 0.02), name=f"n{node}",
                                   after=[tasks[a] for a, b in edges if b == node])
    sched.wait(timeout=60)
    assert all(t.done() and t.exception() is None for t in tasks.values())
    rows = {row["task"]: row for row in done_rows(sched.records)}
    assert len(rows) == 32
    late = [(a, b) for a, b in edges if rows[f"n{b}"]["start"] < rows[f"n{a}"]["end"]]
    assert late == [], f"started before a dependency ended: {late[:3]}"


def test_a_failed_task_fails_its_dependents_by_name_and_the_rest_finishes(two_engines):
    client = two_engines
    sched = EngineScheduler(client)
    bad = sched.submit(divmod, 1, 0, name="divide")
    child = sched.submit(pow, bad, 2, name="child")             # a future as an argument: a dependency
    grandchild = sched.submit(abs, -1, name="grandchild", after=["child"])
    free = sched.submit(pow, 3, 2, name="free")
    sched.wait(timeout=60)
    assert "task 'divide' failed on engine" in str(bad.exception()) and "ZeroDivisionError" in str(bad.exception())
    assert str(child.exception()) == "task 'child' not run: it depends on 'divide', which failed"
    assert str(grandchild.exception()) == "task 'grandchild' not run: it depends on 'child', which failed"
    assert free.result() == 9
    a = sched.submit(pow, 2, 3, name="a")
    assert sched.submit(pow, a, 2, name="b").result(timeout=30) == 64  # a result passed along


def test_cycles_and_unknown_dependencies_are_rejected_before_anything_runs(two_engines):
    client = two_engines
    sched = EngineScheduler(client)
    sched.submit(nap, 0, name="load", after=["evaluate"])
    sched.submit(nap, 0, name="train", after=["load"])
    sched.submit(nap, 0, name="evaluate", after=["train"])
    with pytest.raises(GraphError, match=r"the tasks form a cycle: 'load' -> 'evaluate' -> 'train' -> 'load'"):
        sched.wait()
    sched.submit(nap, 0, name="lonely", after=["nobody"])
    with pytest.raises(GraphError, match=r"task 'lonely' depends on 'nobody', which is not a task of this"):
        sched.wait()
    other = EngineScheduler(client).submit(nap, 0)
    with pytest.raises(GraphError, match="task 'stranger' depends on 'task 0', a task of another EngineScheduler"):
        sched.submit(nap, 0, name="stranger", after=[other])
    assert sched.records == []                                    # nothing ran
    assert sched.map(abs, [-1, -2]) == [1, 2]                    # and the scheduler still works


def test_a_retried_task_finishes_on_an_engine_that_replaced_the_dead_ones(tmp_path):
    """Both engines die, a replacement joins, the retry runs on it. (ipyparallel's load-balanced view
    finishes this too: its TaskScheduler._register_engine rescans the queue with update_graph(None), and
    chapter 05b runs it; but it sends a dead engine's task on only 5 s after the death, _unregister_engine.)"""
    with engine_cluster(2) as (cluster, client):
        sched = EngineScheduler(client, retries=2, engine_wait=30)
        task = sched.submit(dies_on_first_attempts(str(tmp_path), 2), name="twice unlucky")
        threading.Timer(1.0, cluster.start_engines_sync, kwargs=dict(n=1)).start()
        assert task.result(timeout=60) == "survived"
        assert [row["outcome"] for row in sched.records] == ["engine died", "engine died", "done"]
        assert sched.records[-1]["engine"] not in sched.dead


def test_with_retries_above_one_a_task_that_died_twice_still_finishes(tmp_path):
    """retries=3: the third attempt of a task whose engine died twice runs and its result is kept."""
    with engine_cluster(4) as (cluster, client):
        sched = EngineScheduler(client, retries=3)
        task = sched.submit(dies_on_first_attempts(str(tmp_path), 2), name="third time")
        assert task.result(timeout=60) == "survived" and task.attempts == 3


def test_priorities_follow_the_critical_path_and_arrival_order_is_kept_on_ties():
    sched = EngineScheduler(client=None)
    shorts = [sched.submit(nap, 0, name=f"short {i}") for i in range(3)]
    chain = [sched.submit(nap, 0, name="c0")]
    for i in range(1, 4):
        chain.append(sched.submit(nap, 0, name=f"c{i}", after=[chain[-1]], cost=2.0))
    priority = sched.priorities()
    assert [priority[t] for t in chain] == [7.0, 6.0, 4.0, 2.0] and all(priority[s] == 1.0 for s in shorts)


@pytest.mark.parametrize("per_engine", [1, 2])
def test_an_interrupt_ends_the_run_within_seconds_and_the_engines_are_usable_again(two_engines, per_engine):
    """per_engine=2: the task waiting behind the interrupted one is aborted, or the engine would start it."""
    client = two_engines
    sched = EngineScheduler(client, per_engine=per_engine)
    threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match=r"interrupted: 0 tasks had finished, 10 were cancelled"):
        sched.map(nap, [5] * 10)
    assert time.monotonic() - started < 4
    assert sched.map(abs, [-3, 4]) == [3, 4] and len(client.ids) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(retries=-1), "retries must be an integer >= 0, got -1"),
    (dict(order="random"), "unknown order 'random'; valid orders are 'critical path', 'arrival'"),
    (dict(per_engine=0), "per_engine must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineScheduler(None, **kwargs)


def test_a_task_that_is_not_a_function_or_a_name_used_twice_is_refused_at_submit():
    sched = EngineScheduler(None)                     # submitting talks to no engine: nothing runs yet
    sched.submit(abs, -1, name="load")
    with pytest.raises(ValueError, match="there is a task named 'load' already"):
        sched.submit(abs, -2, name="load")
    with pytest.raises(TypeError, match="a task needs a function, got int"):
        sched.submit(3, name="three")


# ----------------------------------------------------------------------------- defects of issue #23, item 3

def test_a_future_of_another_scheduler_is_refused_at_submit_naming_it():
    first, second = EngineScheduler(None), EngineScheduler(None)
    three = first.submit(abs, -3, name="abs")
    for call in (lambda: second.submit(str, three, name="text"),
                 lambda: second.submit(str, 3, name="text", after=[three])):
        with pytest.raises(GraphError, match=r"task 'text' depends on 'abs', a task of another EngineScheduler; "
                                             r"nothing was submitted\. Pass its result instead"):
            call()
    assert list(second.pending) == [] and "text" not in second.tasks   # nothing was submitted
    assert second.submit(str, 3, name="text").name == "text"           # the name is still free


def test_the_critical_path_of_a_chain_of_100000_tasks_is_computed_without_recursion():
    sched = EngineScheduler(None)
    chain = [sched.submit(abs, -1, name="link 0")]
    for i in range(1, 100_000):
        chain.append(sched.submit(abs, -1, after=[chain[-1]], cost=0.5))
    priority = sched.priorities()
    # link i holds up itself and every link after it: 1 + 0.5 * (99,999 - i) for the first, 0.5 * (100,000 - i)
    assert priority[chain[0]] == 1 + 0.5 * 99_999
    assert [priority[chain[i]] for i in (1, 50_000, 99_999)] == [0.5 * 99_999, 0.5 * 50_000, 0.5]


def test_a_chain_longer_than_the_recursion_limit_runs_on_engines_in_order(two_engines):
    links = 1_200  # the old recursive priority raised RecursionError from about 500 links on
    sched = EngineScheduler(two_engines)
    chain = [sched.submit(abs, -1, name="link 0")]
    for i in range(1, links):
        chain.append(sched.submit(int.__add__, chain[-1], 1, name=f"link {i}"))  # the result flows down the chain
    assert chain[-1].result(timeout=90) == links
    rows = {row["task"]: row for row in done_rows(sched.records)}
    assert all(rows[f"link {i}"]["start"] >= rows[f"link {i - 1}"]["end"] for i in range(1, links))


# A fake ipyparallel client: engines that are threads here, for the master's bookkeeping.

class Killed(BaseException):
    """Raised by a task to kill the fake engine that runs it (SIGKILL on a real one)."""


class FakeRemoteError(Exception):
    """What ipyparallel's client stores for a task that raised or whose engine died: ename, evalue."""

    def __init__(self, ename, evalue):
        super().__init__(f"{ename}: {evalue}")
        self.ename, self.evalue = ename, evalue


class FakeAsyncResult(concurrent.futures.Future):
    """Like the MessageFuture of an ipyparallel request: its result is the reply, an exception included
    (the client stores it, it does not raise it)."""

    def __init__(self, msg_id):
        super().__init__()
        self.msg_id = msg_id


class FakeEngine:
    """A view of one engine: runs what it is sent in order, on a thread; a reply arrives `delay` s after the
    task ended. A task that raises Killed kills the engine, and then, like ipyparallel's client when it
    hears of a death (Client._handle_stranded_msgs), every attempt whose reply has not arrived fails at
    once with an EngineError; a reply that arrives after that is dropped (ipyparallel's AsyncResult has
    cleaned up by then; here it only lands in client.results, which the scheduler does not read)."""

    def __init__(self, client, engine, delay):
        self.client, self.engine, self.delay = client, engine, delay
        self.alive, self.out, self.inbox = True, [], queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def use_cloudpickle(self):
        pass

    def apply_async(self, fn, *args):
        ar = FakeAsyncResult(next(self.client.msg_ids))
        with self.client.lock:
            self.out.append(ar)
            if not self.alive:
                self._died()
        self.inbox.put((ar, fn, args))
        return ar

    def _work(self):
        while self.alive:
            ar, fn, args = self.inbox.get()
            try:
                reply = fn(*args)
            except Killed:
                with self.client.lock:
                    self.alive = False
                    self._died()
                return
            except Exception as error:
                reply = FakeRemoteError(type(error).__name__, str(error))
            if self.delay:
                threading.Timer(self.delay, self._reply, args=(ar, reply)).start()
            else:
                self._reply(ar, reply)

    def _reply(self, ar, reply):
        with self.client.lock:
            self.client.results[ar.msg_id] = reply
            if ar in self.out:
                self.out.remove(ar)
                ar.set_result(reply)

    def _died(self):
        for ar in self.out:
            error = FakeRemoteError("EngineError", f"Engine {self.engine} died while running task {ar.msg_id}")
            self.client.results[ar.msg_id] = error
            ar.set_result(error)
        self.out.clear()


class FakeClient:
    def __init__(self, engines, delay=0.0):
        self.results, self.lock, self.msg_ids = {}, threading.Lock(), itertools.count()
        self.views = {engine: FakeEngine(self, engine, delay) for engine in range(engines)}

    @property
    def ids(self):
        return [engine for engine, view in self.views.items() if view.alive]

    def __getitem__(self, engine):
        return self.views[engine]


def square_killing_once_at(die_at):
    """fn(x) = x * x; the first run of x == die_at kills its (fake) engine."""
    killed = []

    def fn(x):
        if x == die_at and not killed:
            killed.append(x)
            raise Killed()
        return x * x
    return fn


@pytest.mark.parametrize("retries", [2, 0])
def test_a_death_is_charged_to_the_task_that_caused_it_when_a_finished_tasks_reply_comes_too_late(retries):
    """per_engine=2 on 2 engines: engine 0 holds items 0 and 2. Item 0 ends, its reply is on its way
    (0.1 s); item 2 kills the engine; the EngineError for both arrives first, and the reply is dropped.
    Item 2 is the one charged; item 0 runs again without using a retry."""
    sched = EngineScheduler(FakeClient(2, delay=0.1), retries=retries, per_engine=2)
    items = [sched.submit(square_killing_once_at(2), x, name=f"item {x}") for x in range(8)]
    sched.wait(timeout=30)
    died = [(row["task"], row["engine"], row["attempt"]) for row in sched.records if row["outcome"] == "engine died"]
    assert died == [("item 2", 0, 1)] and sched.dead == [0]
    first = [row for row in done_rows(sched.records) if row["task"] == "item 0"]
    assert [(row["engine"], row["attempt"]) for row in first] == [(1, 1)]  # run again, no retry used
    assert [items[x].result() for x in range(8) if x != 2] == [x * x for x in range(8) if x != 2]
    if retries:
        assert items[2].result() == 4 and items[2].attempts == 2
    else:
        with pytest.raises(TaskFailed, match=r"task 'item 2' failed: its engine died on each of its 1 attempts "
                                             r"\(engines \[0\]; retries=0\)"):
            items[2].result()


def test_a_task_waiting_behind_the_one_that_killed_its_engine_uses_no_retry():
    sched = EngineScheduler(FakeClient(2), retries=0, per_engine=2)
    assert sched.map(lambda x: x, [1]) == [1]          # the engines joined
    killer = sched.submit(square_killing_once_at(5), 5, name="killer")      # engine 0, runs first
    behind = sched.submit(pow, 3, 2, name="behind")                          # engine 1
    third = sched.submit(pow, 4, 2, name="third")                            # engine 0, behind the killer
    sched.wait(timeout=30)
    assert isinstance(killer.exception(), TaskFailed) and behind.result() == 9 and third.result() == 16
    assert [row["task"] for row in sched.records if row["outcome"] == "engine died"] == ["killer"]


def test_the_masters_work_per_task_does_not_grow_with_the_number_of_tasks(monkeypatch):
    """A map of n tiny tasks: the master looks at each task a bounded number of times (TaskFuture.done
    calls, queue entries shown to ready_tasks), not at every task at every step."""
    calls = {"done": 0, "looked at": 0}
    done, ready = TaskFuture.done, engine_scheduler.ready_tasks

    def counted_done(self):
        calls["done"] += 1
        return done(self)

    def counted_ready(queue, *args):
        calls["looked at"] += len(queue)
        return ready(queue, *args)
    monkeypatch.setattr(TaskFuture, "done", counted_done)
    monkeypatch.setattr(engine_scheduler, "ready_tasks", counted_ready)
    n = 3000
    sched = EngineScheduler(FakeClient(2), per_engine=2)
    assert sched.map(abs, range(-n, 0), timeout=60) == list(range(n, 0, -1))
    per_task = {name: count / n for name, count in calls.items()}
    assert per_task["done"] < 10 and per_task["looked at"] < 4 * sched.WINDOW, per_task


class VanishingEngineClient(FakeClient):
    """client.ids still lists engine 2, but it unregisters before the scheduler asks for its view: like
    ipyparallel's Client, whose IO thread removes a dead engine from client._ids at any moment, and
    client[2] then raises IndexError("No such engine: 2") (Client._build_targets)."""

    @property
    def ids(self):
        return [0, 1, 2]

    def __getitem__(self, engine):
        if engine == 2:
            raise IndexError(f"No such engine: {engine}")
        return self.views[engine]


def test_an_engine_that_unregisters_while_joining_is_counted_dead_and_the_map_runs_on_the_others():
    sched = EngineScheduler(VanishingEngineClient(2))
    assert sched.map(abs, range(-20, 0), timeout=30) == list(range(20, 0, -1))
    assert sched.dead == [2] and sorted(sched.engines) == [0, 1]
    assert {row["engine"] for row in sched.records} == {0, 1}


class IdleDeathClient(FakeClient):
    """Engine 1 dies while it holds no task of ours, after the scheduler has its view: no task of ours
    gets an EngineError, and the view refuses to send, like ipyparallel's once the client's IO thread has
    unregistered the engine: IndexError("No such engine: 1")."""

    def __init__(self):
        super().__init__(2)
        self.joined = self.views[1].apply_async  # the scheduler's first call: it asks the engine's pid
        self.views[1].apply_async = self.refuse

    def refuse(self, fn, *args):
        if self.joined is not None:
            join, self.joined = self.joined, None
            return join(fn, *args)
        raise IndexError("No such engine: 1")


def test_an_engine_that_died_idle_is_counted_dead_when_it_would_get_a_task_and_the_task_goes_elsewhere():
    sched = EngineScheduler(IdleDeathClient(), retries=0, per_engine=2)
    assert sched.map(abs, range(-20, 0), timeout=30) == list(range(20, 0, -1))
    assert sched.dead == [1] and {row["engine"] for row in sched.records} == {0}
    assert all(row["attempt"] == 1 and row["outcome"] == "done" for row in sched.records)


def test_a_failure_at_the_head_of_a_long_chain_fails_every_link_by_name():
    sched = EngineScheduler(FakeClient(1))
    chain = [sched.submit(divmod, 1, 0, name="link 0")]
    for i in range(1, 5_000):
        chain.append(sched.submit(abs, chain[-1], name=f"link {i}"))
    sched.wait(timeout=30)
    assert "ZeroDivisionError" in str(chain[0].exception())
    assert all(str(chain[i].exception()) == f"task 'link {i}' not run: it depends on 'link {i - 1}', which failed"
               for i in range(1, 5_000))
    assert len(sched.records) == 1 and not sched.pending


def test_the_timeline_draws_an_instant_task_and_writes_each_name_in_its_bar_or_clear_of_every_bar():
    """Chapter 05b's pipeline: 'evaluate' (30 ms) did not fit its bar and ran over it; 'report' (print,
    microseconds) had no visible bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from syncml_lib.viz import plot_engine_timeline
    records = [dict(task=f"{step} {shard}", engine=shard, attempt=1, start=start + 0.003 * shard,
                    end=start + 0.003 * shard + length, outcome="done")
               for shard in range(3) for step, start, length in (("load", 0.0, 0.05), ("prep", 0.055, 0.05),
                                                                   ("train", 0.11, 0.1))]
    records += [dict(task="evaluate", engine=0, attempt=1, start=0.22, end=0.25, outcome="done"),
                dict(task="report", engine=0, attempt=1, start=0.252, end=0.252002, outcome="done")]
    fig, ax = plt.subplots(figsize=(5.6, 2.8))
    plot_engine_timeline(records, ax=ax, names=True)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    patches = [p.get_window_extent(renderer) for p in ax.patches]
    span = ax.get_xlim()[1] - ax.get_xlim()[0]
    assert min(p.get_width() for p in ax.patches) >= 0.004 * span        # report's bar shows
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        inside = [p for p in patches if p.x0 - 0.5 <= box.x0 and box.x1 <= p.x1 + 0.5 and p.y0 - 0.5 <= box.y0
                  and box.y1 <= p.y1 + 0.5]
        crossed = [p for p in patches if box.overlaps(p)]
        assert inside or not crossed, f"{text.get_text()!r} runs over a bar"
        assert ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 + 1, f"{text.get_text()!r} leaves the axes"
    assert sorted(text.get_text() for text in ax.texts) == sorted(row["task"] for row in records)
    plt.close(fig)
