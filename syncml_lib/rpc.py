"""Request and reply over MPI, and runs that end on every rank: the plumbing of chapters 02, 04, 05.

    # on the server rank: answer requests until every client has sent "done"
    def add(source, header, arrays):
        return {"sum": header["a"] + header["b"]}, [arrays[0] * 2]
    serve(comm, {"add": add}, clients=[1, 2, 3])

    # on a client rank
    header, arrays = call(comm, 0, "add", {"a": 1, "b": 2}, [np.arange(3)])   # {'sum': 3}, [array([0, 2, 4])]
    call(comm, 0, "done")

A request is a `kind` (a short string that picks the handler), a small `header` dict and a list of
numpy arrays; a reply is a header and a list of arrays. The kind, the header and the arrays' shapes
and dtypes travel pickled (small control messages); the array contents travel as raw bytes with
buffer-based Isend/Irecv, never pickled. Requests, replies and their arrays each have their own tag,
and MPI delivers the messages between two ranks with one tag in the order they were sent.

A handler returns (reply_header, reply_arrays) to answer at once, or DEFER to answer later with
reply(comm, source, header, arrays): a parameter server holds back a pull that must wait for the
other workers' pushes. Every request gets exactly one reply, or none because the run is over:
a handler that raises ends the run on every rank (abort, below), since the server cannot know
what its clients would do next with a half-done request.

No deadlock: a client has at most one request outstanding and waits for its reply, so whenever the
server sends to a client, that client is waiting to receive it. A call costs 2 control messages
plus one message per array in each direction.

Every wait is a loop in Python, never a blocking MPI call: a rank waiting for a message sleeps
between looks (so it leaves its core to the ranks that have work), can be interrupted, and looks
for an ABORT message too. abort(comm, message) sends one to every other rank; each of them raises
RunAborted(message) in its next wait. With Run (a run on its own duplicate communicator) that is how
one rank's failure or interrupt ends the run everywhere within moments instead of leaving the
others waiting for it, and why the next run in the same processes starts clean.
"""
import contextlib
import signal
import threading
import time
from collections import namedtuple

import numpy as np
from mpi4py import MPI

__all__ = ["serve", "call", "reply", "abort", "Run", "RunAborted", "roles", "Roles", "check_same_on_all_ranks",
           "refuse_on_every_rank", "wait_until", "complete",
           "wait_sleeping", "interrupts_noted", "swallow_interrupts", "DEFER", "DONE"]

REQUEST, REQUEST_ARRAY, REPLY, REPLY_ARRAY, ABORT = 7301, 7302, 7303, 7304, 7305  # tags, away from 0
DONE = "done"  # the kind a client sends when it has no more requests
DEFER = object()  # what a handler returns when it will answer later with reply()
IDLE_SLEEP = 1e-5  # seconds between looks of a rank waiting for a message (Linux makes it ~60 us)


class RunAborted(RuntimeError):
    """The run was ended on every rank; the message says which rank ended it and why (a handler or a
    worker that raised, an interrupted rank). .interrupted: it was ended by a Ctrl-C / SIGINT."""

    def __init__(self, message, interrupted=False):
        super().__init__(message)
        self.interrupted = interrupted


# ----------------------------------------------------------------------------- waiting, asleep and interruptible

def _check_abort(comm):
    if comm.Iprobe(source=MPI.ANY_SOURCE, tag=ABORT):
        raise RunAborted(*comm.recv(source=MPI.ANY_SOURCE, tag=ABORT))


SPIN = 0.002  # seconds a rank finishing a transfer keeps poking MPI (yielding its core) before it sleeps


def wait_until(comm, done):
    """Wait until done() is true, looking for an abort in between (RunAborted). A big message moves
    in pieces, each when MPI is poked, so for the first SPIN seconds poke without sleeping (yielding
    the core to whoever needs it); after that, sleep between pokes: the other side is busy elsewhere."""
    started = time.monotonic()
    while not done():
        _check_abort(comm)
        time.sleep(0 if time.monotonic() - started < SPIN else IDLE_SLEEP)


def complete(comm, requests):
    """Wait until every MPI request in the list has completed (RunAborted if a rank aborts meanwhile)."""
    wait_until(comm, lambda: MPI.Request.Testall(requests))


def _receive(comm, source, tag, status=None, on_idle=None, idle_every=0.01):
    """Receive one pickled message (matched probe, then a nonblocking receive), asleep while there is
    none. comm.recv alone would wait too, but inside MPI, spinning (MPICH): an idle server would keep
    a core busy, and neither an interrupt nor an abort could reach it. on_idle(), if given, is called
    every idle_every seconds while nothing comes."""
    next_idle = time.monotonic() + idle_every
    while (message := comm.improbe(source=source, tag=tag, status=status)) is None:
        _check_abort(comm)
        time.sleep(IDLE_SLEEP)
        if on_idle is not None and time.monotonic() >= next_idle:
            on_idle()
            next_idle = time.monotonic() + idle_every
    request, received = message.irecv(), []
    wait_until(comm, lambda: received.append(request.test()) or received[-1][0])
    return received[-1][1]


def wait_sleeping(request, interval=IDLE_SLEEP):
    """Wait for a nonblocking MPI request (comm.Ibarrier(), comm.Isend(...)) asleep `interval` seconds
    between looks, instead of spinning inside MPI: a rank that waits leaves its core to the ranks
    that have work (a longer interval, for a rank idle while others are timed, leaves more)."""
    while not request.Test():
        time.sleep(interval)


def abort(comm, message, interrupted=False):
    """Tell every other rank of comm that the run is over: each raises RunAborted(message) in its
    next wait. Returns at once (the messages are small and go out in the background)."""
    requests = [comm.isend((message, interrupted), dest=rank, tag=ABORT) for rank in range(comm.size)
                if rank != comm.rank]
    _left_behind.append((comm, requests))


# ----------------------------------------------------------------------------- arrays on the wire

def _specs(arrays):
    """Check the arrays and return them with their (shape, dtype) list, to send ahead of them."""
    arrays = [np.asarray(a) for a in arrays]
    for a in arrays:
        if a.dtype.hasobject:
            raise TypeError(f"rpc: arrays must hold numbers, not Python objects (dtype {a.dtype})")
    return arrays, [(a.shape, a.dtype) for a in arrays]


def _raw(a):
    """The bytes of array a as a flat uint8 array (a view when a is contiguous), for Isend and Irecv."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _send(comm, control, arrays, dest, tag, array_tag):
    """Send a pickled control message and then each array's bytes; return once all have gone."""
    complete(comm, [comm.isend(control, dest=dest, tag=tag)] +
              [comm.Isend([_raw(a), MPI.BYTE], dest=dest, tag=array_tag) for a in arrays])


def _recv_arrays(comm, specs, source, tag):
    arrays = [np.empty(shape, dtype=dtype) for shape, dtype in specs]
    complete(comm, [comm.Irecv([_raw(a), MPI.BYTE], source=source, tag=tag) for a in arrays])
    return arrays


# ----------------------------------------------------------------------------- client side

def call(comm, server, kind, header=None, arrays=()):
    """Send a request to rank `server` and wait for its reply; return (reply_header, reply_arrays).

    Raises RunAborted if the run ends meanwhile (the server's handler raised, or any rank aborted).
    """
    arrays, specs = _specs(arrays)
    _send(comm, (kind, header or {}, specs), arrays, server, REQUEST, REQUEST_ARRAY)
    reply_header, reply_specs = _receive(comm, server, REPLY)
    return reply_header, _recv_arrays(comm, reply_specs, server, REPLY_ARRAY)


# ----------------------------------------------------------------------------- server side

def reply(comm, client, header=None, arrays=()):
    """Answer the request that rank `client` is waiting on (the one a handler deferred)."""
    arrays, specs = _specs(arrays)
    _send(comm, (header or {}, specs), arrays, client, REPLY, REPLY_ARRAY)


def serve(comm, handlers, clients, on_idle=None, idle_every=0.01, name=None):
    """Answer requests from any rank until every rank in `clients` has sent DONE ("done").

    handlers maps a kind to handler(source, header, arrays), which returns (reply_header,
    reply_arrays), or DEFER if it answers with reply(comm, source, ...) itself, now or later (a
    handler may also answer other deferred requests with reply()). Requests are handled one at a
    time, in the order they arrive. If a handler raises (or the kind is unknown), the run ends:
    abort() tells every rank, and this rank raises RunAborted("server 0: KeyError: 'w2'") too
    (`name` instead of "server 0" if given).
    on_idle(), if given, is called every idle_every seconds while no request comes (a task master
    checks its deadlines there).
    """
    if DONE in handlers:
        raise ValueError(f"serve: the kind {DONE!r} is reserved for clients that have finished")
    waiting_for = set(clients)
    status = MPI.Status()
    while waiting_for:
        kind, header, specs = _receive(comm, MPI.ANY_SOURCE, REQUEST, status, on_idle, idle_every)
        source = status.Get_source()
        arrays = _recv_arrays(comm, specs, source, REQUEST_ARRAY)
        if kind == DONE:
            waiting_for.discard(source)
            reply(comm, source)
            continue
        try:
            handler = handlers.get(kind)
            if handler is None:
                raise ValueError(f"unknown request kind {kind!r} from rank {source}; this server handles "
                                 f"{', '.join(map(repr, [*handlers, DONE]))}")
            answer = handler(source, header, arrays)
            if answer is None:
                raise TypeError(f"the handler for {kind!r} returned None; it must return "
                                f"(reply_header, reply_arrays), or DEFER")
        except RunAborted:
            raise
        except Exception as error:
            message = f"{name or f'server {comm.rank}'}: {type(error).__name__}: {error}"
            abort(comm, message)
            raise RunAborted(message) from error
        if answer is not DEFER:
            reply(comm, source, *answer)


# ----------------------------------------------------------------------------- one run, ended on every rank

_left_behind = []  # communicators of aborted runs, and abort messages under way: see Run


@contextlib.contextmanager
def interrupts_noted():
    """Within the block, SIGINT (Ctrl-C, a notebook's interrupt of a %%px cell) appends to the list it
    yields instead of raising KeyboardInterrupt. (Only the main thread can set signal handlers;
    elsewhere nothing is caught.)"""
    noted = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C until the block is over, then raise KeyboardInterrupt. For blocks of collective calls
    that every rank must finish together: a rank that left one halfway would leave the others waiting
    inside MPI, where nothing reaches them."""
    with interrupts_noted() as noted:
        yield
    if noted:
        raise KeyboardInterrupt


INTERRUPT_GRACE = 1.0  # seconds a rank that heard of an interrupt elsewhere waits for its own


def swallow_interrupts(seconds=None):
    """Wait `seconds`, ignoring SIGINT. A notebook's interrupt sends SIGINT to every engine, one after
    the other; a rank that another rank's abort ended first would otherwise get its own SIGINT just
    after returning, in the middle of ipyparallel sending its result, which is then lost.
    seconds: INTERRUPT_GRACE by default."""
    if threading.current_thread() is not threading.main_thread():
        return
    seconds = INTERRUPT_GRACE if seconds is None else seconds
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        time.sleep(seconds)
    finally:
        signal.signal(signal.SIGINT, previous)


class Run:
    """One collective run of a parameter server, a key-value store or a task master, ended on every
    rank whatever happens on one of them.

        with rpc.Run(comm, "run_kvstore") as run:
            with run.setup():              # collectives that every rank must finish together
                check_same_on_all_ranks(run.comm, "run_kvstore", replicas=replicas)
            ...                            # serve / call on run.comm
            everyone = run.allgather(mine) # the results, once every rank has finished

    run.comm is a duplicate of comm, with its own message space: messages left over by an earlier
    run that was interrupted can never be taken for this run's. An error or Ctrl-C on one rank in the
    main part sends an abort to every other rank, which raises RunAborted("run_kvstore: rank 2 was
    interrupted (KeyboardInterrupt)") in its next wait, so no rank is left waiting. A run that ends
    normally frees its duplicate; an aborted one keeps it, since messages may still be under way on
    it and MPI could reuse a freed communicator's context for a later run. An error raised inside
    setup() is the same on every rank (argument checks), so it aborts nothing.
    """

    def __init__(self, comm, name):
        self.parent, self.name = comm, name
        self.comm, self.in_setup, self.finished, self.aborted = None, False, False, False

    def __enter__(self):
        with _interrupts_held():
            self.comm = self.parent.Dup()
        return self

    @contextlib.contextmanager
    def setup(self):
        self.in_setup = True
        with _interrupts_held():
            yield
            self.in_setup = False  # not reached if the block raised

    def abort(self, message, interrupted=False):
        """Tell every other rank that the run is over, with `message` (this rank goes on to raise)."""
        self.aborted = True
        abort(self.comm, message, interrupted)

    def fail(self, message):
        """End the run on every rank with `message`, raising RunAborted(message) here too."""
        self.abort(message)
        raise RunAborted(message)

    def own_failure(self, error, who, where=""):
        """This rank's own code (a worker's grad_fn, a client's function) raised `error`: end the run on
        every rank. Ctrl-C: the others hear "worker 1 was interrupted at step 3" and this rank goes on
        with its KeyboardInterrupt; any other error: every rank raises RunAborted("worker 1 failed at
        step 3: ValueError: ...")."""
        place = f" {where}" if where else ""
        if isinstance(error, KeyboardInterrupt):
            self.abort(f"{who} was interrupted{place} (KeyboardInterrupt); the run was ended on every rank",
                       interrupted=True)
            raise error
        self.fail(f"{who} failed{place}: {type(error).__name__}: {error}")

    def allgather(self, mine):
        """Everyone's `mine`, by rank, once every rank has got here (pickle-based: small results).
        RunAborted if a rank aborts before it gets here; an interrupt meanwhile waits for the end."""
        with _interrupts_held():
            complete(self.comm, [self.comm.Ibarrier()])
            everyone = self.comm.allgather(mine)
            self.finished = True
        return everyone

    def __exit__(self, kind, error, traceback):
        if error is None or self.in_setup or self.finished:
            self.comm.Free()
            return False
        _left_behind.append(self.comm)
        if isinstance(error, RunAborted) and error.interrupted:
            swallow_interrupts()
        if self.aborted or isinstance(error, RunAborted):
            return False
        who = f"{self.name}: rank {self.comm.rank}"
        if isinstance(error, KeyboardInterrupt):
            abort(self.comm, f"{who} was interrupted (KeyboardInterrupt); the run was ended on every rank", True)
        else:
            abort(self.comm, f"{who} failed: {type(error).__name__}: {error}")
        return False


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


def refuse_on_every_rank(comm, name, problem):
    """Raise ValueError on every rank if any rank has a problem with its own arguments (a string, or None).

        refuse_on_every_rank(comm, "run_barrier_steps", None if ok else "delays must be >= 0")

    For arguments that may differ across ranks (each rank's own data): a rank that raised alone would
    leave the others waiting in the run's first collective. One small pickle-based allgather; the
    message names the first rank with a problem, e.g. "run_barrier_steps: on rank 2, delays must be >= 0".
    """
    everyone = comm.allgather(problem)
    bad = [(rank, theirs) for rank, theirs in enumerate(everyone) if theirs]
    if bad:
        rank, first = bad[0]
        others = f" (and on rank{'s' if len(bad) > 2 else ''} {', '.join(str(r) for r, _ in bad[1:])})" if bad[1:] else ""
        raise ValueError(f"{name}: on rank {rank}, {first}{others}")
