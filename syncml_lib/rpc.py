"""Request and reply over MPI: one server rank answers the requests of many client ranks.

    # on the server rank: answer requests until every client has sent "done"
    def add(source, header, arrays):
        return {"sum": header["a"] + header["b"]}, [arrays[0] * 2]
    serve(comm, {"add": add}, clients=[1, 2, 3])

    # on a client rank
    header, arrays = call(comm, 0, "add", {"a": 1, "b": 2}, [np.arange(3)])   # {'sum': 3}, [array([0, 2, 4])]
    call(comm, 0, "done")

A request is a `kind` (a short string that picks the handler), a small `header` dict and a list of
numpy arrays; a reply is a header and a list of arrays. The kind, the header and the arrays' shapes
and dtypes travel pickled with comm.send (small control messages); the array contents travel as raw
bytes with buffer-based comm.Send, never pickled. Control messages and array payloads, requests and
replies each have their own tag, so one is never taken for another, and MPI delivers the messages
between two ranks with one tag in the order they were sent.

A handler returns (reply_header, reply_arrays) to answer at once, or DEFER to answer later with
reply(comm, source, header, arrays): a parameter server holds back a pull that must wait for the
other workers' pushes. A handler that raises sends the error back instead: call() raises
RemoteError("server 0: KeyError: 'w2'") on the calling rank, and the server carries on.

No deadlock: a client has at most one request outstanding and waits for its reply, so whenever the
server sends to a client, that client is waiting to receive it. A call costs 2 control messages
plus one message per array in each direction. A rank waiting for a request or a reply sleeps
between looks instead of spinning, so it leaves its core to the ranks that have work.
"""
import time
import traceback
from collections import namedtuple

import numpy as np
from mpi4py import MPI

__all__ = ["serve", "call", "reply", "roles", "Roles", "check_same_on_all_ranks", "wait_sleeping", "RemoteError",
           "DEFER", "DONE"]

REQUEST, REQUEST_ARRAY, REPLY, REPLY_ARRAY = 7301, 7302, 7303, 7304  # tags, away from the default 0
DONE = "done"  # the kind a client sends when it has no more requests
DEFER = object()  # what a handler returns when it will answer later with reply()


class RemoteError(RuntimeError):
    """A handler on the server raised; the message names the server, the error type and its text.
    .remote_traceback holds the server's traceback."""

    def __init__(self, message, remote_traceback=""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


# ----------------------------------------------------------------------------- arrays on the wire

def _specs(arrays):
    """Check the arrays and return them with their (shape, dtype) list, to send ahead of them."""
    arrays = [np.asarray(a) for a in arrays]
    for a in arrays:
        if a.dtype.hasobject:
            raise TypeError(f"rpc: arrays must hold numbers, not Python objects (dtype {a.dtype})")
    return arrays, [(a.shape, a.dtype) for a in arrays]


def _raw(a):
    """The bytes of array a as a flat uint8 array (a view when a is contiguous), for Send and Recv."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _send_arrays(comm, arrays, dest, tag):
    for a in arrays:
        comm.Send([_raw(a), MPI.BYTE], dest=dest, tag=tag)


def _recv_arrays(comm, specs, source, tag):
    arrays = []
    for shape, dtype in specs:
        a = np.empty(shape, dtype=dtype)
        comm.Recv([_raw(a), MPI.BYTE], source=source, tag=tag)
        arrays.append(a)
    return arrays


IDLE_SLEEP = 1e-5  # seconds between looks of a rank waiting for a message (Linux makes it ~60 us)


def wait_sleeping(request):
    """Wait for a nonblocking MPI request (comm.Ibarrier(), comm.Isend(...)) asleep between looks,
    instead of spinning inside MPI: a rank that waits leaves its core to the ranks that have work."""
    while not request.Test():
        time.sleep(IDLE_SLEEP)


def _wait_for(comm, source, tag, on_idle=None, idle_every=0.01):
    """Return once a message from `source` with `tag` has arrived, sleeping while there is none.

    comm.recv alone would wait too, but MPICH waits by spinning: an idle server, or a worker held
    back by the consistency rule, would keep a core busy. With more ranks than cores (4 engines on
    a 2-core laptop) that core is taken from the ranks that have work; in bench.py's parameter
    server this sleeping made a step 1.5-1.8x faster. The cost: up to ~60 us more latency per request.
    on_idle(), if given, is called every idle_every seconds while nothing comes.
    """
    next_idle = time.monotonic() + idle_every
    while not comm.Iprobe(source=source, tag=tag):
        time.sleep(IDLE_SLEEP)
        if on_idle is not None and time.monotonic() >= next_idle:
            on_idle()
            next_idle = time.monotonic() + idle_every


# ----------------------------------------------------------------------------- client side

def call(comm, server, kind, header=None, arrays=()):
    """Send a request to rank `server` and wait for its reply; return (reply_header, reply_arrays).

    Raises RemoteError if the server's handler raised (or knows no such kind).
    """
    arrays, specs = _specs(arrays)
    comm.send((kind, header or {}, specs), dest=server, tag=REQUEST)
    _send_arrays(comm, arrays, server, REQUEST_ARRAY)
    _wait_for(comm, server, REPLY)
    ok, reply_header, reply_specs = comm.recv(source=server, tag=REPLY)
    reply_arrays = _recv_arrays(comm, reply_specs, server, REPLY_ARRAY)
    if not ok:
        raise RemoteError(reply_header["error"], reply_header["traceback"])
    return reply_header, reply_arrays


# ----------------------------------------------------------------------------- server side

def reply(comm, client, header=None, arrays=()):
    """Answer the request that rank `client` is waiting on (the one a handler deferred)."""
    arrays, specs = _specs(arrays)
    comm.send((True, header or {}, specs), dest=client, tag=REPLY)
    _send_arrays(comm, arrays, client, REPLY_ARRAY)


def _reply_error(comm, client, error):
    text = f"server {comm.rank}: {type(error).__name__}: {error}"
    comm.send((False, {"error": text, "traceback": traceback.format_exc()}, []), dest=client, tag=REPLY)


def serve(comm, handlers, clients, on_idle=None, idle_every=0.01):
    """Answer requests from any rank until every rank in `clients` has sent DONE ("done").

    handlers maps a kind to handler(source, header, arrays), which returns (reply_header,
    reply_arrays), or DEFER if it answers with reply(comm, source, ...) itself, now or later (a
    handler may also answer other deferred requests with reply()). Requests are handled one at a
    time, in the order they arrive. Every request gets exactly one reply. on_idle(), if given, is called
    every idle_every seconds while no request comes (a task master checks its deadlines there).
    """
    if DONE in handlers:
        raise ValueError(f"serve: the kind {DONE!r} is reserved for clients that have finished")
    waiting_for = set(clients)
    status = MPI.Status()
    while waiting_for:
        _wait_for(comm, MPI.ANY_SOURCE, REQUEST, on_idle, idle_every)
        kind, header, specs = comm.recv(source=MPI.ANY_SOURCE, tag=REQUEST, status=status)
        source = status.Get_source()
        arrays = _recv_arrays(comm, specs, source, REQUEST_ARRAY)
        if kind == DONE:
            waiting_for.discard(source)
            reply(comm, source)
            continue
        try:
            handler = handlers.get(kind)
            if handler is None:
                raise ValueError(f"unknown request kind {kind!r}; this server handles "
                                 f"{', '.join(map(repr, [*handlers, DONE]))}")
            answer = handler(source, header, arrays)
            if answer is None:
                raise TypeError(f"the handler for {kind!r} returned None; it must return "
                                f"(reply_header, reply_arrays), or DEFER")
            if answer is not DEFER:
                reply(comm, source, *answer)
        except Exception as error:
            _reply_error(comm, source, error)


# ----------------------------------------------------------------------------- who is who

Roles = namedtuple("Roles", "is_server index servers workers")
Roles.__doc__ = """This rank's role: is_server, its index among the servers or among the workers
(0-based), and the ranks of all servers and of all workers."""


def roles(comm, n_servers):
    """Ranks 0 .. n_servers-1 are servers, the others workers. Returns this rank's Roles.

    Raises ValueError (on every rank: it depends only on comm.size and n_servers) unless there is
    at least one server and at least one worker.
    """
    if not isinstance(n_servers, int) or n_servers < 1:
        raise ValueError(f"n_servers must be a positive integer, got {n_servers!r}")
    if comm.size - n_servers < 1:
        raise ValueError(f"{n_servers} server{'s' if n_servers > 1 else ''} on {comm.size} "
                         f"rank{'s' if comm.size > 1 else ''} leaves no worker: "
                         f"run on at least {n_servers + 1} ranks")
    servers, workers = list(range(n_servers)), list(range(n_servers, comm.size))
    is_server = comm.rank < n_servers
    index = comm.rank if is_server else comm.rank - n_servers
    return Roles(is_server, index, servers, workers)


def check_same_on_all_ranks(comm, name, **fields):
    """Raise ValueError on every rank unless every rank passed equal values for each field.

        check_same_on_all_ranks(comm, "allreduce", shape=x.shape, dtype=str(x.dtype))

    Costs one small pickle-based allgather; the values should be small and compare with == to a
    bool (tuples, strings, numbers). The message names each distinct value and the ranks that had
    it, e.g. "allreduce: shapes differ across ranks: (4,) on ranks 0, 1, 3; (5,) on rank 2".
    """
    everyone = comm.allgather(fields)
    problems = []
    for key in fields:
        values = [theirs[key] for theirs in everyone]
        if all(value == values[0] for value in values):
            continue
        groups = {}  # value -> ranks that have it, in order of first appearance
        for rank, value in enumerate(values):
            groups.setdefault(repr(value), []).append(rank)
        described = "; ".join(f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
                              for value, ranks in groups.items())
        plural = key if key.endswith("s") else key + "s"
        problems.append(f"{name}: {plural} differ across ranks: {described}")
    if problems:
        raise ValueError("\n".join(problems))
