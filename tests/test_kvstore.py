"""kvstore.py: the ring in process (against a brute-force reading of its definition); the store under
real mpiexec with 2-5 ranks, 1-3 servers and 1-3 replicas, crashes included."""
import functools
import time

import numpy as np
import pytest

from syncml_lib.data import stable_hash
from syncml_lib.kvstore import HashRing, KeyUnavailable, ring_owners, run_kvstore
from syncml_lib.mpirun import run

KEYS = [f"key-{i}" for i in range(2000)]


def brute_force_owners(points, key_hash, replicas):
    """Walk the ring point by point from the smallest position >= key_hash (wrapping), keep new servers."""
    order = sorted(points)
    start = next((i for i, (position, _) in enumerate(order) if position >= key_hash), 0)
    walk = [order[(start + i) % len(order)][1] for i in range(len(order))]
    return list(dict.fromkeys(walk))[:replicas]


@pytest.mark.parametrize("servers, vnodes", [([0], 1), ([0, 1, 2], 1), ([0, 1, 2], 16), ([3, 7, 1, 0], 8)])
def test_owners_are_the_next_distinct_servers_clockwise(servers, vnodes):
    ring = HashRing(servers, vnodes)
    for replicas in range(1, len(servers) + 1):
        for key in KEYS[:300]:
            assert ring.owners(key, replicas) == brute_force_owners(ring.points, stable_hash(key), replicas)


def test_ring_owners_wraps_around_and_skips_repeated_servers():
    points = [(10, "a"), (20, "a"), (30, "b"), (40, "c")]
    assert ring_owners(points, 5, 2) == ["a", "b"]          # before the first point
    assert ring_owners(points, 20, 2) == ["a", "b"]         # exactly on a point: that point
    assert ring_owners(points, 35, 3) == ["c", "a", "b"]    # wraps past the largest position
    assert ring_owners(points, 41, 1) == ["a"]


def test_adding_a_server_moves_about_one_in_s_plus_one_keys_and_only_to_it():
    before, after = HashRing(range(4), vnodes=64), HashRing(range(5), vnodes=64)
    moved = [key for key in KEYS if before.owners(key) != after.owners(key)]
    assert all(after.owners(key) == [4] for key in moved)   # keys move only to the new server
    assert 0.1 < len(moved) / len(KEYS) < 0.3               # about 1/5, where hash % S moves about 4/5
    modulo_moved = sum(stable_hash(key) % 4 != stable_hash(key) % 5 for key in KEYS)
    assert modulo_moved / len(KEYS) > 0.7


def test_more_points_per_server_even_out_the_load():
    def spread(vnodes):
        counts = np.bincount([HashRing(range(4), vnodes).owners(key)[0] for key in KEYS], minlength=4)
        return counts.max() / counts.mean()
    assert spread(128) < spread(1)
    assert spread(128) < 1.3


def test_bad_rings_and_replicas_are_refused():
    with pytest.raises(ValueError, match="distinct servers"):
        HashRing([0, 0])
    with pytest.raises(ValueError, match="vnodes"):
        HashRing([0], vnodes=0)
    with pytest.raises(ValueError, match="from 1 to the number of servers"):
        HashRing([0, 1]).owners("k", 3)


# ----------------------------------------------------------------------------- the store under mpiexec

CONFIGS = [(p, s, r) for p in (2, 3, 4, 5) for s in (1, 2, 3) if s < p for r in (1, 2, 3) if r <= s]


def value_of(client, i):
    return np.arange(i % 7, dtype=np.float64) * (client + 1) + i


def put_get_job(comm, n_servers, replicas):
    def client(store):
        mine = [f"c{store.index}-{i}" for i in range(40)]
        for i, key in enumerate(mine):
            assert store.put(key, value_of(store.index, i)) == replicas
        wrong = [key for i, key in enumerate(mine) if not np.array_equal(store.get(key), value_of(store.index, i))]
        for key in mine[::2]:
            store.delete(key)
        errors = []
        for key in (mine[0], "never-put"):
            try:
                store.get(key)
            except KeyError as error:
                errors.append(str(error))
        return {"wrong": wrong, "errors": errors, "owners": {key: store.owners(key) for key in mine}}
    return run_kvstore(comm, client, n_servers=n_servers, replicas=replicas)


@pytest.mark.parametrize("p, n_servers, replicas", CONFIGS)
def test_put_get_delete_on_every_replica(p, n_servers, replicas):
    results = run(functools.partial(put_get_job, n_servers=n_servers, replicas=replicas), p, timeout=60)
    result = results[0]
    assert all(r == result for r in results[1:])                     # the same result on every rank
    clients = p - n_servers
    for returned in result.returns:
        assert returned["wrong"] == []
        assert "no key 'c" in returned["errors"][0] and "no key 'never-put'" in returned["errors"][1]
    # after deleting every other key: 20 keys per client, each on `replicas` servers, placed by the ring
    ring = HashRing(range(n_servers))
    expected = np.zeros(n_servers, dtype=int)
    for c in range(clients):
        for i in range(1, 40, 2):
            for server in ring.owners(f"c{c}-{i}", replicas):
                expected[server] += 1
    assert result.keys_per_server == expected.tolist()
    assert sum(result.keys_per_server) == 20 * clients * replicas
    assert result.returns[0]["owners"]["c0-1"] == ring.owners("c0-1", replicas)


def crash_job(comm, n_servers, replicas, crashed):
    def client(store):
        for i in range(60):
            store.put(f"k{i}", np.full(2, float(i)))
        if store.index == 0:
            for server in crashed:
                store.crash(server)
        readable, unavailable = 0, []
        for i in range(60):
            try:
                assert np.array_equal(store.get(f"k{i}"), np.full(2, float(i)))
                readable += 1
            except KeyUnavailable:
                unavailable.append(f"k{i}")
        return {"readable": readable, "unavailable": unavailable}
    return run_kvstore(comm, client, n_servers=n_servers, replicas=replicas)


@pytest.mark.parametrize("replicas, crashed", [(2, [1]), (3, [0, 2]), (1, [1]), (2, [0, 1])])
def test_a_key_survives_as_long_as_one_of_its_replicas(replicas, crashed):
    """One client (so the crash comes after every put): keys whose owners all crashed are unavailable,
    every other key is read back intact."""
    result = run(functools.partial(crash_job, n_servers=3, replicas=replicas, crashed=crashed), 4, timeout=60)[0]
    ring = HashRing(range(3))
    lost = sorted(f"k{i}" for i in range(60) if set(ring.owners(f"k{i}", replicas)) <= set(crashed))
    assert sorted(result.returns[0]["unavailable"]) == lost
    assert result.returns[0]["readable"] == 60 - len(lost)
    assert result.down == [s in crashed for s in range(3)]
    if replicas > len(crashed):
        assert lost == []


def racing_writers_job(comm, rounds):
    """Every client writes keys r0, r1, ... at the same time as the others (the same key in the same round),
    then says it is done; client 0 waits for all, compares each key's two replicas, reads every key,
    crashes server 0 and reads every key again."""
    def client(store):
        n_clients = comm.size - 2
        for r in range(rounds):
            store.put(f"r{r}", np.array([float(store.index), float(r)]))
        store.put(f"done-{store.index}", np.zeros(1))
        if store.index != 0:
            return None
        while True:  # wait until every client has finished writing
            try:
                for c in range(n_clients):
                    store.get(f"done-{c}")
                break
            except KeyError:
                time.sleep(0.01)
        disagree = []
        before = {}
        for r in range(rounds):
            key = f"r{r}"
            values = [store._ask(s, "get", {"key": key})[1][0] for s in store.owners(key)]
            if not all(np.array_equal(v, values[0]) for v in values):
                disagree.append(key)
            before[key] = store.get(key)
        store.crash(0)
        changed = [key for key, value in before.items() if not np.array_equal(store.get(key), value)]
        return {"disagree": disagree, "changed by the crash": changed}
    return run_kvstore(comm, client, n_servers=2, replicas=2).returns[0]


def test_concurrent_writers_leave_the_replicas_agreeing_and_a_crash_changes_nothing():
    """3 clients write the same 300 keys at once; without an order per key, the two replicas of a key
    get the writes in different orders and end up disagreeing on some keys."""
    found = run(functools.partial(racing_writers_job, rounds=300), 5, timeout=60)[0]
    assert found["disagree"] == [] and found["changed by the crash"] == []


def write_after_crash_job(comm, first, second):
    def client(store):
        store.crash(first)
        for i in range(100):
            assert store.put(f"k{i}", np.full(3, float(i))) == 2   # on 2 live servers, not 1
        store.crash(second)
        lost = []
        for i in range(100):
            try:
                assert np.array_equal(store.get(f"k{i}"), np.full(3, float(i)))
            except KeyUnavailable:
                lost.append(f"k{i}")
        return lost
    return run_kvstore(comm, client, n_servers=4, replicas=2).returns[0]


@pytest.mark.parametrize("second", [0, 2, 3])
def test_keys_written_after_a_crash_survive_one_more(second):
    """With R = 2, a key put after server 1 crashed goes to the next live server in its place, so any one
    further crash leaves a copy (skipping the dead owner would leave about half the keys on one server)."""
    assert run(functools.partial(write_after_crash_job, first=1, second=second), 5, timeout=60)[0] == []


def error_job(comm, case):
    def client(store):
        if case == "key type" and store.index == 0:
            store.put(7, np.zeros(1))
        if case == "object value" and store.index == 0:
            store.put("k", np.array([object()]))
        if case == "crash index" and store.index == 0:
            store.crash(5)
        if case == "client raises" and store.index == 1:
            raise ZeroDivisionError("boom")
        if case == "interrupted" and store.index == 1:
            raise KeyboardInterrupt("stop")                 # what interrupting a notebook cell raises
        if case == "unpicklable result" and store.index == 0:
            import threading
            return threading.Lock()
        return "ok"
    try:
        run_kvstore(comm, client, n_servers=2, replicas=2)
    except (Exception, KeyboardInterrupt) as error:
        return type(error).__name__, str(error)
    return None


@pytest.mark.parametrize("case, message", [
    ("key type", "client 0 failed: TypeError: keys must be str, got int 7"),
    ("object value", "client 0 failed: TypeError: values must be numpy arrays of numbers"),
    ("crash index", "client 0 failed: ValueError: server must be 0 .. 1, got 5"),
    ("client raises", "client 1 failed: ZeroDivisionError: boom"),
    ("unpicklable result", "client 0 failed: TypeError: cannot pickle '_thread.lock' object"),
])
def test_a_failing_client_ends_the_run_on_every_rank_with_its_error(case, message):
    reports = run(functools.partial(error_job, case=case), 4, timeout=60)
    assert all(report[0] == "RunAborted" and report[1].startswith(message) for report in reports), reports


def test_an_interrupted_client_ends_the_run_on_every_rank():
    reports = run(functools.partial(error_job, case="interrupted"), 4, timeout=60)
    assert reports[3] == ("KeyboardInterrupt", "stop")  # client 1 is rank 3
    assert all(report == ("RunAborted", "client 1 was interrupted (KeyboardInterrupt); the run was ended on every rank")
               for report in reports[:3]), reports


def config_job(comm, **kwargs):
    try:
        run_kvstore(comm, lambda store: None, **kwargs)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("kwargs, message", [
    ({"n_servers": 2, "replicas": 3}, "replicas must be an integer from 1 to n_servers (2)"),
    ({"n_servers": 3, "replicas": 1}, "leaves no worker"),
])
def test_bad_configurations_fail_on_every_rank(kwargs, message):
    reports = run(functools.partial(config_job, **kwargs), 3, timeout=60)
    assert all(report is not None and message in report for report in reports), reports


def test_ranks_that_disagree_on_the_configuration_all_hear_it():
    def job(comm):
        try:
            run_kvstore(comm, lambda store: None, n_servers=1, replicas=1, vnodes=64 if comm.rank else 32)
        except ValueError as error:
            return str(error)
    reports = run(job, 3, timeout=60)
    assert all("vnodes differ across ranks: 32 on rank 0; 64 on ranks 1, 2" in r for r in reports), reports
