"""EngineScheduler on real plain ipyparallel engines: engines SIGKILLed mid-task lose no task and duplicate
none, a poisoned task is given up by name, task graphs run in dependency order, bad graphs never start,
and the two situations where ipyparallel's own load-balanced view never finishes do finish here."""
import os
import random
import signal
import threading
import time

import pytest

from syncml_lib.cluster import engine_cluster
from syncml_lib.engine_scheduler import EngineScheduler, GraphError, TaskFailed
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


def test_a_task_graph_starts_each_task_after_all_its_dependencies_ended():
    edges = random_dag(32, 128, seed=7)
    rng = random.Random(1)
    with engine_cluster(4) as (cluster, client):
        sched = EngineScheduler(client)
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
    sched.submit(nap, 0, name="stranger", after=[other])
    with pytest.raises(GraphError, match="which is not a task of this scheduler"):
        sched.wait()
    assert sched.records == []                                    # nothing ran
    assert sched.map(abs, [-1, -2]) == [1, 2]                    # and the scheduler still works


def test_a_retried_task_finishes_on_an_engine_that_replaced_the_dead_ones(tmp_path):
    """ipyparallel's view never sends a retry to an engine that joined later (ipython/ipython#7368)."""
    with engine_cluster(2) as (cluster, client):
        sched = EngineScheduler(client, retries=2, engine_wait=30)
        task = sched.submit(dies_on_first_attempts(str(tmp_path), 2), name="twice unlucky")
        threading.Timer(1.0, cluster.start_engines_sync, kwargs=dict(n=1)).start()
        assert task.result(timeout=60) == "survived"
        assert [row["outcome"] for row in sched.records] == ["engine died", "engine died", "done"]
        assert sched.records[-1]["engine"] not in sched.dead


def test_with_retries_above_one_a_task_that_died_twice_still_finishes(tmp_path):
    """ipyparallel's view with retries > 1 can leave such a result never ready (ipython/ipython#7846)."""
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


def test_an_interrupt_ends_the_run_within_seconds_and_the_engines_are_usable_again(two_engines):
    client = two_engines
    sched = EngineScheduler(client)
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
