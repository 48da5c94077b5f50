"""A sharded, replicated key-value store over MPI, with keys placed by consistent hashing.

    def client(store):                          # runs on every client rank
        store.put(f"w{store.index}", np.arange(3.0))   # stored on `replicas` servers
        return store.get("w0")                  # KeyError if no client put it
    result = run_kvstore(comm, client, n_servers=3, replicas=2)
    result.returns           # what client returned, by client (the same on every rank)
    result.keys_per_server   # how many keys each server holds

The ring. Each server is put at `vnodes` points on a circle of 2^64 positions (stable_hash of
"server s/i"). A key hashes to a position too; its owners are the first `replicas` distinct servers
met going clockwise from there (ring_owners). Adding a server takes over only the keys just
before its own points, about 1/(S+1) of them, from their old owners; removing one hands its keys to
the next servers on the ring. With owner = hash % S instead, changing S moves about S/(S+1) of all
keys. Many points per server even out how many keys each one holds.

The store. Ranks 0 .. S-1 are servers, each a dict of key -> numpy array answering requests
through rpc.py; the other ranks are clients and run client_fn(store). A key's replicas live on the
first R *live* servers met clockwise from it (a dead owner's place is taken by the next live server).
put writes to each of them in ring order (synchronous replication: it returns once they all hold
the value); get asks the first live one; delete removes the key from all of them.

Writes are ordered by the key's first live owner. Two clients putting the same key at once would
otherwise reach its replicas in different orders, leave them holding different values, and a crash
would change what get returns with no write. So the first live owner gives every put of a key a
version, (a counter it increments, the client's index), and each replica keeps the value with the
highest version it has seen: in whatever order the writes arrive, the replicas end up agreeing.

Failures. store.crash(s) makes server s answer every later request with "down", like a machine that
died (a real client would find out by a timeout; MPI has none, so the server stays up to say so).
Clients then skip it. With R replicas, a key survives any R - 1 crashed servers, also a key written
after earlier crashes (it went to R live servers); when all its replicas are down, get raises
KeyUnavailable. A crashed server stays down for the rest of the run.

Cost: a put of m bytes moves R m bytes (R requests in a row); a get moves m bytes; each request is
one rpc call (2 control messages and the array).

A failing client (client_fn raises, or is interrupted) ends the run on every rank at once
(rpc.Run): every rank raises RunAborted("client 1 failed: ..."). If several fail at the same moment,
each rank names the first failure it heard of.
"""
import bisect
import pickle
from dataclasses import dataclass

import numpy as np

from . import rpc
from .rpc import RunAborted, check_same_on_all_ranks
from .data import stable_hash

__all__ = ["ring_owners", "HashRing", "KVClient", "KVResult", "KeyUnavailable", "run_kvstore"]


# ----------------------------------------------------------------------------- the ring

def ring_owners(points, key_hash, replicas):
    """The owners of a key: the first `replicas` distinct servers at or clockwise after key_hash.

    points is the ring, a list of (position, server) sorted by position; going clockwise past the
    largest position wraps around to the smallest. A server with several points counts once."""
    start = bisect.bisect_left(points, (key_hash,))  # the first point at or after key_hash
    owners = []
    for i in range(len(points)):
        server = points[(start + i) % len(points)][1]
        if server not in owners:
            owners.append(server)
            if len(owners) == replicas:
                break
    return owners


class HashRing:
    """Servers placed at `vnodes` points each on a ring of 2^64 positions.

        ring = HashRing(servers=[0, 1, 2], vnodes=64)
        ring.owners("user-42", replicas=2)       # e.g. [2, 0]
        HashRing([0, 1, 2, 3]).owners("user-42") # the same first owner, unless 3 took the key over
    """

    def __init__(self, servers, vnodes=64):
        servers = list(servers)
        if not servers or len(set(servers)) != len(servers):
            raise ValueError(f"a ring needs one or more distinct servers, got {servers}")
        if not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be a positive integer, got {vnodes!r}")
        self.servers, self.vnodes = servers, vnodes
        self.points = sorted((stable_hash(f"server {s}/{i}"), s) for s in servers for i in range(vnodes))

    def owners(self, key, replicas=1):
        """The `replicas` servers that hold key, the first one first."""
        if not isinstance(replicas, int) or not 1 <= replicas <= len(self.servers):
            raise ValueError(f"replicas must be an integer from 1 to the number of servers ({len(self.servers)}), "
                             f"got {replicas!r}")
        return ring_owners(self.points, stable_hash(key), replicas)


# ----------------------------------------------------------------------------- a server

class _Server:
    """One server rank's keys with their versions, and its answers to put, get, delete, stats and crash."""

    def __init__(self):
        self.data, self.versions, self.issued = {}, {}, {}  # key -> value; key -> version; key -> last counter given
        self.down, self.requests = False, 0

    def handlers(self):
        return {kind: self._unless_down(handler) for kind, handler in
                {"put": self.put, "get": self.get, "delete": self.delete, "stats": self.stats,
                 "crash": self.crash}.items()}

    def _unless_down(self, handler):
        def answer(source, header, arrays):
            if self.down:
                return {"down": True}, []
            self.requests += 1
            return handler(header, arrays)
        return answer

    def put(self, header, arrays):
        """Keep the value if its version is the highest this server has seen for the key. A put with
        no version comes to the key's first live owner, which gives it the next one."""
        key, version = header["key"], header["version"]
        if version is None:
            counter = max(self.issued.get(key, 0), self.versions.get(key, (0,))[0]) + 1
            self.issued[key] = counter
            version = (counter, header["client"])
        version = tuple(version)
        if key not in self.versions or version > self.versions[key]:
            self.data[key], self.versions[key] = arrays[0], version  # rpc received it into a new array
        return {"version": version}, []

    def get(self, header, arrays):
        value = self.data.get(header["key"])
        return ({"found": False}, []) if value is None else ({"found": True}, [value])

    def delete(self, header, arrays):
        self.versions.pop(header["key"], None)
        return {"found": self.data.pop(header["key"], None) is not None}, []

    def stats(self, header, arrays):
        return {"keys": len(self.data), "bytes": sum(v.nbytes for v in self.data.values()),
                "requests": self.requests}, []

    def crash(self, header, arrays):
        self.down = True
        return {}, []


# ----------------------------------------------------------------------------- a client

class KeyUnavailable(KeyError):
    """Every server that holds the key is down: it may exist, but nobody can read it now."""


def _check_key(key):
    if not isinstance(key, str):
        raise TypeError(f"keys must be str, got {type(key).__name__} {key!r}")


class KVClient:
    """What client_fn gets: put, get, delete and crash on the store. .index counts clients from 0."""

    def __init__(self, comm, index, servers, ring, replicas):
        self.comm, self.index, self.servers, self.ring, self.replicas = comm, index, servers, ring, replicas
        self.known_down = set()

    def owners(self, key):
        """The servers (0-based among the servers) that hold key when none is down, first one first."""
        _check_key(key)
        return self.ring.owners(key, self.replicas)

    def _clockwise(self, key):
        """Every server, in ring order from the key: its owners first, then those that take their place."""
        _check_key(key)
        return self.ring.owners(key, len(self.servers))

    def _ask(self, server, kind, header, arrays=()):
        """The reply of server (0-based), or None if it is down."""
        if server in self.known_down:
            return None
        reply_header, reply_arrays = rpc.call(self.comm, self.servers[server], kind, header, arrays)
        if reply_header.get("down"):
            self.known_down.add(server)
            return None
        return reply_header, reply_arrays

    def _on_live_replicas(self, key, kind, header, arrays=()):
        """Send the request to the first `replicas` live servers clockwise from key, one after the other
        (a server found down on the way is replaced by the next one); return their answers."""
        answers = []
        for server in self._clockwise(key):
            answer = self._ask(server, kind, header(answers), arrays)
            if answer is not None:
                answers.append(answer)
                if len(answers) == self.replicas:
                    break
        return answers

    def put(self, key, value):
        """Store value (a numpy array of numbers) under key on its live replicas; return how many hold it.
        The first of them gives the write its version; the others get that version with it."""
        _check_key(key)
        value = np.asarray(value)
        if value.dtype.hasobject:
            raise TypeError(f"values must be numpy arrays of numbers, got dtype {value.dtype} for key {key!r}")

        def header(answers):
            return {"key": key, "client": self.index, "version": answers[0][0]["version"] if answers else None}

        stored = len(self._on_live_replicas(key, "put", header, [value]))
        if stored == 0:
            raise KeyUnavailable(f"cannot put {key!r}: every server is down")
        return stored

    def get(self, key):
        """The value of key, from its first live replica. KeyError if the key is not in the store;
        KeyUnavailable if all the servers that held it are down."""
        for server in self._clockwise(key):
            answer = self._ask(server, "get", {"key": key})
            if answer is None:
                continue
            header, arrays = answer
            if header["found"]:
                return arrays[0]
            owners = self.owners(key)
            if set(owners) <= self.known_down:  # written before they crashed: lost with them
                raise KeyUnavailable(f"key {key!r} is unavailable: all its servers {owners} are down "
                                     f"(server {server}, which took their place, does not have it)")
            raise KeyError(f"no key {key!r} in the store (asked server {server}, its first live replica)")
        raise KeyUnavailable(f"key {key!r} is unavailable: every server is down")

    def delete(self, key):
        """Remove key from its live replicas. KeyError if none of them had it."""
        answers = self._on_live_replicas(key, "delete", lambda answers: {"key": key})
        if not any(header["found"] for header, _ in answers):
            raise KeyError(f"no key {key!r} in the store")

    def crash(self, server):
        """Make server (0-based among the servers) fail: it answers every later request with "down"."""
        if server not in range(len(self.servers)):
            raise ValueError(f"server must be 0 .. {len(self.servers) - 1}, got {server!r}")
        self._ask(server, "crash", {})
        self.known_down.add(server)


# ----------------------------------------------------------------------------- the whole run

@dataclass
class KVResult:
    """What run_kvstore returns, the same on every rank: returns (client_fn's return value, by client),
    and per server: keys_per_server, bytes_per_server, requests_per_server (those it answered while
    up), down (whether it crashed)."""
    returns: list
    keys_per_server: list
    bytes_per_server: list
    requests_per_server: list
    down: list


def _run_client(run, me, ring, replicas, client_fn):
    """client_fn(store) on a client rank; its return value. A failure ends the run on every rank."""
    store = KVClient(run.comm, me.index, me.servers, ring, replicas)
    try:
        returned = client_fn(store)
        pickle.dumps(returned)  # it travels to every rank: find out now, not in the final allgather
    except RunAborted:
        raise
    except BaseException as error:
        run.own_failure(error, f"client {me.index}")
    for s in me.servers:
        rpc.call(run.comm, s, rpc.DONE)
    return returned


def run_kvstore(comm, client_fn, *, n_servers=1, replicas=1, vnodes=64):
    """Run a key-value store on all ranks of comm (collective); return a KVResult.

    Ranks 0 .. n_servers-1 serve; every other rank calls client_fn(store) with a KVClient (store.index:
    0, 1, ... among the clients). The clients run at the same time, each at its own pace; the servers
    answer requests in the order they come. If client_fn raises on a client (or returns something that
    cannot be pickled), every rank raises RunAborted("client 1 failed: KeyError: ...") at once.
    """
    with rpc.Run(comm, "run_kvstore") as run:
        with run.setup():
            check_same_on_all_ranks(run.comm, "run_kvstore", n_servers=n_servers, replicas=replicas, vnodes=vnodes)
            me = rpc.roles(run.comm, n_servers)
            if not isinstance(replicas, int) or not 1 <= replicas <= n_servers:
                raise ValueError(f"replicas must be an integer from 1 to n_servers ({n_servers}), got {replicas!r}")
            ring = HashRing(range(n_servers), vnodes)

        if me.is_server:
            server = _Server()
            rpc.serve(run.comm, server.handlers(), clients=me.workers)
            mine = {"keys": len(server.data), "bytes": sum(v.nbytes for v in server.data.values()),
                    "requests": server.requests, "down": server.down}
        else:
            mine = _run_client(run, me, ring, replicas, client_fn)
        everyone = run.allgather(mine)

    servers = everyone[:n_servers]
    return KVResult(everyone[n_servers:], [s["keys"] for s in servers], [s["bytes"] for s in servers],
                    [s["requests"] for s in servers], [s["down"] for s in servers])
