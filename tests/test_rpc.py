"""rpc.py: request/reply over MPI, under real mpiexec (2 servers, 2 clients), plus roles() in process.

One mpiexec job runs every case: each client calls both servers (echo, deferred replies, errors,
many calls in a row) and returns what it saw; the tests read that report.
"""
import functools
import time
from types import SimpleNamespace

import numpy as np
import pytest

from syncml_lib import rpc
from syncml_lib.mpirun import run




def sample_arrays(seed):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(3, 4)).astype(np.float32),
        rng.integers(-2**62, 2**62, size=5, dtype=np.int64),
        np.zeros(0),                                  # 0-length
        np.zeros((0, 3), dtype=np.float32),
        np.asarray(7, dtype=np.int64),                # 0-d
        rng.normal(size=(4, 3)).T,                    # not contiguous
        np.array([True, False, True]),
        np.array([1 + 2j, -3.5j]),
    ]


def same_arrays(got, sent):
    """None if got equals sent exactly (shapes, dtypes, bytes), else what differs."""
    if len(got) != len(sent):
        return f"{len(got)} arrays came back, {len(sent)} were sent"
    for i, (a, b) in enumerate(zip(got, sent)):
        if not isinstance(a, np.ndarray) or a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
            return f"array {i}: sent {b.dtype} {b.shape}, got {getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}"
    return None


def outcome(call):
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return None


def job(comm):
    me = rpc.roles(comm, 2)
    if me.is_server:
        meeting = []  # clients waiting in "meet"
        calls = []

        def echo(source, header, arrays):
            calls.append(source)
            return header, arrays

        def whoami(source, header, arrays):
            return {"source": source, "n": header["n"]}, [np.full(header["n"], source)]

        def meet(source, header, arrays):
            meeting.append(source)
            if len(meeting) == len(me.workers):  # the last one in: answer everybody
                for waiting in meeting:
                    rpc.reply(comm, waiting, {"met": sorted(meeting), "server": comm.rank})
                meeting.clear()
            return rpc.DEFER

        rpc.serve(comm, {"echo": echo, "whoami": whoami, "meet": meet}, clients=me.workers)
        return {"echo calls": len(calls)}

    report = {"problems": []}
    for server in me.servers:
        sent = sample_arrays([comm.rank, server])
        header, got = rpc.call(comm, server, "echo", {"x": 1, "s": "hi", "rank": comm.rank}, sent)
        if header != {"x": 1, "s": "hi", "rank": comm.rank}:
            report["problems"].append(f"server {server}: header came back as {header}")
        problem = same_arrays(got, sent)
        if problem:
            report["problems"].append(f"server {server}: {problem}")
        header, got = rpc.call(comm, server, "echo")  # no header, no arrays
        if header != {} or got != []:
            report["problems"].append(f"server {server}: an empty request came back as {header}, {got}")

    for n in range(20):  # many calls in a row, alternating servers: every reply is for this rank
        server = me.servers[n % 2]
        header, (filled,) = rpc.call(comm, server, "whoami", {"n": n})
        if header != {"source": comm.rank, "n": n} or filled.shape != (n,) or np.any(filled != comm.rank):
            report["problems"].append(f"whoami {n}: got {header}, {filled}")

    report["met"] = [rpc.call(comm, server, "meet")[0] for server in me.servers]
    report["object array"] = outcome(lambda: rpc.call(comm, 0, "echo", arrays=[np.array([{}, None])]))
    report["still works"] = outcome(lambda: rpc.call(comm, 1, "echo", {"ok": True}))
    for server in me.servers:
        rpc.call(comm, server, rpc.DONE)
    return report


@functools.cache
def reports():
    return run(job, 4, timeout=30)


def test_arrays_and_headers_round_trip_exactly():
    servers, clients = reports()[:2], reports()[2:]
    for client in clients:
        assert not client["problems"], client["problems"]
    # 2 echo calls from each of 2 clients to each server, and the "still works" echo to server 1
    assert [server["echo calls"] for server in servers] == [4, 6]


def test_a_deferred_reply_waits_for_every_client():
    for client in reports()[2:]:
        assert client["met"] == [{"met": [2, 3], "server": 0}, {"met": [2, 3], "server": 1}]


def test_a_client_side_error_raises_on_the_caller_only():
    for client in reports()[2:]:
        kind, message = client["object array"]
        assert kind == "TypeError" and "Python objects" in message
        assert client["still works"] is None


def failing_handlers_job(comm):
    """Rank 0 serves; ranks 1 and 2 are clients. In each case one request makes the server's handler
    fail; rank 2 is then waiting for a deferred reply ("park"). Each case is its own rpc.Run."""
    def boom(source, header, arrays):
        return {}[header["key"]]

    def forgets_to_return(source, header, arrays):
        pass

    def acknowledges_then_fails(source, header, arrays):
        rpc.reply(comm_of_run[0], source, {"ok": True})  # the request's one reply...
        raise OSError("disk full")                        # ...then the work after it fails

    def park(source, header, arrays):
        return rpc.DEFER  # answered never: only the end of the run releases rank 2

    cases = {"boom": ("boom", {"key": "w2"}), "unknown kind": ("bomo", {}), "forgets": ("forgets", {}),
             "after the reply": ("ack", {})}
    found, comm_of_run = {}, [None]
    for case, (kind, header) in cases.items():
        try:
            with rpc.Run(comm, case) as run:
                comm_of_run[0] = run.comm
                if comm.rank == 0:
                    rpc.serve(run.comm, {"boom": boom, "forgets": forgets_to_return, "ack": acknowledges_then_fails,
                                         "park": park}, clients=[1, 2])
                elif comm.rank == 1:
                    time.sleep(0.2)  # rank 2 is parked by now
                    found[case + " replied"] = rpc.call(run.comm, 0, kind, header)[0]
                    rpc.call(run.comm, 0, "park")  # after the acknowledgement: waits for a reply that never comes
                else:
                    rpc.call(run.comm, 0, "park")
                run.allgather(None)
            found[case] = None
        except rpc.RunAborted as error:
            found[case] = str(error)
    with rpc.Run(comm, "afterwards") as run:  # the next run in the same processes is clean
        found["afterwards"] = run.allgather(comm.rank * 10)
    return found


def test_a_failing_handler_ends_the_run_on_every_rank():
    """The server stops serving, the caller and a client parked on a deferred reply are released, each
    with the server's message: nobody waits for the run's time limit. A handler that fails after it
    has replied sends no second reply."""
    found = run(failing_handlers_job, 3, timeout=30)
    for on_rank in found:
        assert on_rank["boom"] == "server 0: KeyError: 'w2'"
        assert on_rank["unknown kind"].startswith("server 0: ValueError: unknown request kind 'bomo' from rank 1")
        for name in ("boom", "forgets", "ack", "park", "done"):
            assert repr(name) in on_rank["unknown kind"]
        assert on_rank["forgets"].startswith("server 0: TypeError: the handler for 'forgets' returned None")
        assert on_rank["after the reply"] == "server 0: OSError: disk full"
        assert on_rank["afterwards"] == [0, 10, 20]
    assert found[1]["after the reply replied"] == {"ok": True}


def test_roles_split_the_ranks():
    comm = SimpleNamespace(size=5, rank=0)
    assert rpc.roles(comm, 2) == rpc.Roles(True, 0, [0, 1], [2, 3, 4])
    comm.rank = 3
    assert rpc.roles(comm, 2) == rpc.Roles(False, 1, [0, 1], [2, 3, 4])


@pytest.mark.parametrize("size, n_servers", [(1, 1), (2, 2), (3, 5)])
def test_roles_refuse_to_leave_no_worker(size, n_servers):
    for rank in range(size):  # the answer depends on size and n_servers only: the same on every rank
        with pytest.raises(ValueError, match="leaves no worker"):
            rpc.roles(SimpleNamespace(size=size, rank=rank), n_servers)


@pytest.mark.parametrize("n_servers", [0, -1, 1.5])
def test_roles_need_a_positive_number_of_servers(n_servers):
    with pytest.raises(ValueError, match="n_servers"):
        rpc.roles(SimpleNamespace(size=4, rank=0), n_servers)


def test_done_is_reserved():
    with pytest.raises(ValueError, match="reserved"):
        rpc.serve(None, {"done": lambda *args: ({}, [])}, clients=[1])


def idle_job(comm):
    """Rank 0 serves; rank 1 keeps it waiting 0.5 s for its first request, then waits 0.5 s for a deferred
    reply. Returns the CPU seconds each rank used while it waited (a spinning wait uses about 0.5)."""
    import time

    if comm.rank == 0:
        def slow(source, header, arrays):
            time.sleep(0.5)                    # the client waits for this reply
            return {}, []
        start = time.process_time()
        rpc.serve(comm, {"slow": slow}, clients=[1])
        return time.process_time() - start
    time.sleep(0.5)                            # the server waits for a request meanwhile
    start = time.process_time()
    rpc.call(comm, 0, "slow")
    used = time.process_time() - start
    rpc.call(comm, 0, rpc.DONE)
    return used


def test_a_waiting_rank_sleeps_instead_of_spinning():
    """A server between requests, and a client waiting for its reply, leave their core to the others
    (with more ranks than cores, a spinning wait takes the core from the ranks that have work)."""
    server_cpu, client_cpu = run(idle_job, 2, timeout=60)
    assert server_cpu < 0.2, f"the server used {server_cpu:.2f} s of CPU while waiting 0.5 s for a request"
    assert client_cpu < 0.2, f"the client used {client_cpu:.2f} s of CPU while waiting 0.5 s for its reply"
