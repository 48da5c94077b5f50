"""`bench engines`: EngineScheduler (chapter 05b) against ipyparallel's load-balanced view, on plain engines.

    python -m syncml_lib.bench engines
    python -m syncml_lib.bench engines --engines 2 --tasks 50 --repeat 1

No mpiexec: it starts its own cluster of plain engines (cluster.engine_cluster) and always stops it.
Three tables, both schedulers measured in the same run, on the same engines:

1. throughput: `tasks` empty tasks, per second (median of `repeat` runs, taking turns), with one task per
   engine at a time (per_engine=1, the default) and two (per_engine=2: an engine starts its next task
   without waiting for a round trip through the kernel);
2. recovery: a map of 40 tasks of 20 ms in which one task kills its engine (SIGKILL) the first time it
   runs. The task writes the time of its death first; its retry reports when it started; both are
   time.time() on the same machine. A replacement engine is started after each run. With per_engine=1 and
   per_engine=2 (the dead engine held one task, or two);
3. task graphs: the makespan (first start to last end, on the engines' clocks) against the lower bound
   max(longest chain of costs, total cost / engines), for critical-path and arrival order and for the
   view with `after=` dependencies; median of `repeat` runs.
"""
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from ..cluster import add_engines, engine_cluster
from ..engine_scheduler import EngineScheduler
from .common import format_time, print_table, progress

RECOVERY_TASKS, RECOVERY_SECONDS, KILLER = 40, 0.02, 13


def empty(x):
    return x


def nap(seconds):
    import time
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def square_but_one_kills_once(x, killer, marker, seconds):
    """Sleep, then return (x * x, when this attempt started); item `killer` kills its engine the first time,
    after writing the time of its death into `marker`."""
    import os
    import signal
    import time
    start = time.time()
    time.sleep(seconds)
    if x == killer and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as out:
            out.write(repr(time.time()))
        os.rename(marker + ".tmp", marker)
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x, start


def time_throughput(client, n_tasks, repeat):
    """{name: tasks per second} for n_tasks empty tasks, median of `repeat` runs taking turns."""
    lview = client.load_balanced_view()
    calls = {"EngineScheduler": lambda: EngineScheduler(client).map(empty, range(n_tasks)),
             "EngineScheduler, per_engine=2": lambda: EngineScheduler(client, per_engine=2).map(empty, range(n_tasks)),
             "load-balanced view": lambda: lview.map_sync(empty, range(n_tasks))}
    times = {name: [] for name in calls}
    for name, call in calls.items():            # warm up: imports, connections
        assert call() == list(range(n_tasks)), name
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: n_tasks / statistics.median(t) for name, t in times.items()}


def time_recovery(cluster, client, name, per_engine=None):
    """One map with a death: (seconds from the death to the retry's start, seconds for the whole map)."""
    marker = os.path.join(tempfile.mkdtemp(prefix="syncml-bench-"), "died")
    args = (KILLER, marker, RECOVERY_SECONDS)
    items = range(RECOVERY_TASKS)
    engines_before = len(client.ids)
    start = time.perf_counter()
    if per_engine is not None:
        sched = EngineScheduler(client, retries=2, per_engine=per_engine)
        results = sched.map(lambda x: square_but_one_kills_once(x, *args), items, timeout=120)
    else:
        lview = client.load_balanced_view()
        lview.retries = 2
        results = lview.map_sync(lambda x: square_but_one_kills_once(x, *args), items)
    took = time.perf_counter() - start
    assert [r for r, _ in results] == [x * x for x in items], f"{name}: wrong results"
    with open(marker) as died:
        death = float(died.read())
    add_engines(cluster, client, engines_before - len(client.ids))
    return results[KILLER][1] - death, took


def random_dag(n_nodes, n_edges, seed):
    """{node: [nodes it depends on]}: n_edges distinct edges i -> j with i < j (so no cycle), seeded."""
    rng = np.random.default_rng(seed)
    pairs = [(i, j) for j in range(n_nodes) for i in range(j)]
    chosen = rng.choice(len(pairs), size=n_edges, replace=False)
    depends_on = {node: [] for node in range(n_nodes)}
    for k in sorted(chosen):
        i, j = pairs[k]
        depends_on[j].append(i)
    return depends_on


def chain_and_shorts(shorts=12, links=4):
    """Independent tasks submitted first, then a chain: arrival order runs the chain last."""
    depends_on = {f"short {i}": [] for i in range(shorts)}
    for i in range(links):
        depends_on[f"chain {i}"] = [f"chain {i - 1}"] if i else []
    return depends_on


def lower_bound(depends_on, cost, engines):
    """max(the longest chain of costs, total cost / engines): no schedule on `engines` engines is faster."""
    finish = {}

    def longest(node):
        if node not in finish:
            finish[node] = cost[node] + max((longest(d) for d in depends_on[node]), default=0.0)
        return finish[node]
    return max(max(longest(node) for node in depends_on), sum(cost.values()) / engines)


def makespan_scheduler(client, depends_on, cost, order):
    sched = EngineScheduler(client, order=order)
    for node, deps in depends_on.items():          # dict order is submission (arrival) order
        sched.submit(nap, cost[node], name=str(node), cost=cost[node], after=[str(d) for d in deps])
    sched.wait(timeout=120)
    return max(r["end"] for r in sched.records) - min(r["start"] for r in sched.records)


def makespan_view(client, depends_on, cost):
    lview = client.load_balanced_view()
    submitted = {}
    for node, deps in depends_on.items():
        with lview.temp_flags(after=[submitted[d] for d in deps]):
            submitted[node] = lview.apply_async(nap, cost[node])
    spans = [ar.get(timeout=120) for ar in submitted.values()]
    return max(end for _, end in spans) - min(start for start, _ in spans)


def time_graphs(client, repeat, seed=0):
    """Rows [graph, lower bound, {column: median makespan}] for the two graphs."""
    rng = np.random.default_rng(seed)
    dag = random_dag(32, 128, seed)
    graphs = {"random, 32 tasks, 128 edges": (dag, {node: float(rng.uniform(0.02, 0.1)) for node in dag})}
    chain = chain_and_shorts()
    graphs["12 short tasks, then a chain of 4"] = (chain, {node: 0.1 for node in chain})
    engines = len(client.ids)
    rows = []
    for title, (depends_on, cost) in graphs.items():
        calls = {"critical path": lambda: makespan_scheduler(client, depends_on, cost, "critical path"),
                 "arrival": lambda: makespan_scheduler(client, depends_on, cost, "arrival"),
                 "load-balanced view, after=": lambda: makespan_view(client, depends_on, cost)}
        spans = {name: statistics.median(call() for _ in range(repeat)) for name, call in calls.items()}
        rows.append((title, lower_bound(depends_on, cost, engines), spans))
    return rows


def main(args):
    if os.environ.get("PMI_SIZE", "1") != "1":  # under mpiexec -n 2 or more: each rank would start a cluster
        if os.environ.get("PMI_RANK") == "0":
            print("bench engines starts its own plain engines: run it without mpiexec, "
                  "python -m syncml_lib.bench engines", file=sys.stderr)
        sys.exit(1)
    with engine_cluster(args.engines) as (cluster, client):
        progress(None, f"throughput: {args.tasks} empty tasks, {args.repeat} rounds")
        throughput = time_throughput(client, args.tasks, args.repeat)
        progress(None, "recovery from a killed engine")
        recovery = {"EngineScheduler": time_recovery(cluster, client, "ours", 1),
                    "EngineScheduler, per_engine=2": time_recovery(cluster, client, "ours", 2),
                    "load-balanced view": time_recovery(cluster, client, "load-balanced view")}
        progress(None, "makespans of two task graphs")
        graphs = time_graphs(client, args.repeat)
    view = throughput["load-balanced view"]
    print(f"{args.tasks} empty tasks on {args.engines} plain engines: tasks per second, median of {args.repeat} runs "
          f"(ratio to ipyparallel's load-balanced view)")
    print_table(["scheduler", "tasks per second", "ratio"],
                [[name, f"{rate:.0f}", f"{rate / view:.2f}x"] for name, rate in throughput.items()])
    print(f"\nan engine killed (SIGKILL) in a map of {RECOVERY_TASKS} tasks of {RECOVERY_SECONDS * 1000:.0f} ms, "
          f"retries=2: from the death to the task running again on another engine")
    print_table(["scheduler", "death to retry", "whole map"],
                [[name, format_time(back), format_time(took)] for name, (back, took) in recovery.items()])
    print(f"\ntask graphs of sleeps on {args.engines} engines: makespan, median of {args.repeat} runs "
          f"(ratio to the lower bound max(longest chain, total work / engines))")
    names = list(graphs[0][2])
    print_table(["graph", "lower bound", *names],
                [[title, format_time(bound), *[f"{format_time(spans[n])} ({spans[n] / bound:.2f}x)" for n in names]]
                 for title, bound, spans in graphs])
