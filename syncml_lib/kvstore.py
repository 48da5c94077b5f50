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
through rpc.py; the other ranks are clients and run client_fn(store). put writes to every owner
(synchronous replication: it returns once all live owners hold the value), get asks the owners in
ring order and takes the first live answer, delete removes the key from every owner.

Failures. store.crash(s) makes server s answer every later request with "down", like a machine that
died (a real client would find out by a timeout; MPI has none, so the server stays up to say so).
Clients then skip it. With R replicas, a key survives any R - 1 crashed servers; when all its owners
are down, get raises KeyUnavailable. A crashed server stays down for the rest of the run.

Cost: a put of m bytes moves R m bytes (R requests in a row); a get moves m bytes; each request is
one rpc call (2 control messages and the array).
"""
import bisect
import pickle
from dataclasses import dataclass

import numpy as np

from . import rpc
from .rpc import check_same_on_all_ranks
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
    """One server rank's keys, and its answers to put, get, delete, stats and crash."""

    def __init__(self):
        self.data, self.down, self.requests = {}, False, 0

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
        self.data[header["key"]] = arrays[0]  # rpc received it into a new array: nobody else has it
        return {}, []

    def get(self, header, arrays):
        value = self.data.get(header["key"])
        return ({"found": False}, []) if value is None else ({"found": True}, [value])

    def delete(self, header, arrays):
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
        """The servers (0-based among the servers) that hold key, in the order get asks them."""
        _check_key(key)
        return self.ring.owners(key, self.replicas)

    def _ask(self, server, kind, header, arrays=()):
        """The reply of server (0-based), or None if it is down."""
        if server in self.known_down:
            return None
        reply_header, reply_arrays = rpc.call(self.comm, self.servers[server], kind, header, arrays)
        if reply_header.get("down"):
            self.known_down.add(server)
            return None
        return reply_header, reply_arrays

    def put(self, key, value):
        """Store value (a numpy array of numbers) under key on every live owner; return how many hold it."""
        _check_key(key)
        value = np.asarray(value)
        if value.dtype.hasobject:
            raise TypeError(f"values must be numpy arrays of numbers, got dtype {value.dtype} for key {key!r}")
        owners = self.owners(key)
        stored = sum(self._ask(s, "put", {"key": key}, [value]) is not None for s in owners)
        if stored == 0:
            raise KeyUnavailable(f"cannot put {key!r}: all its servers {owners} are down")
        return stored

    def get(self, key):
        """The value of key, from the first live owner. KeyError if it has none; KeyUnavailable if all
        owners are down."""
        owners = self.owners(key)
        for server in owners:
            answer = self._ask(server, "get", {"key": key})
            if answer is not None:
                (header, arrays) = answer
                if not header["found"]:
                    raise KeyError(f"no key {key!r} in the store (asked server {server}, its first live owner)")
                return arrays[0]
        raise KeyUnavailable(f"key {key!r} is unavailable: all its servers {owners} are down")

    def delete(self, key):
        """Remove key from every live owner. KeyError if none of them had it."""
        owners = self.owners(key)
        answers = [self._ask(s, "delete", {"key": key}) for s in owners]
        if not any(answer is not None and answer[0]["found"] for answer in answers):
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


def run_kvstore(comm, client_fn, *, n_servers=1, replicas=1, vnodes=64):
    """Run a key-value store on all ranks of comm (collective); return a KVResult.

    Ranks 0 .. n_servers-1 serve; every other rank calls client_fn(store) with a KVClient (store.index:
    0, 1, ... among the clients). The clients run at the same time, each at its own pace; the servers
    answer requests in the order they come. If client_fn raises on a client (or returns something that
    cannot be pickled), every rank raises RuntimeError("client 1 failed: KeyError: ...") once all
    clients are done.
    """
    check_same_on_all_ranks(comm, "run_kvstore", n_servers=n_servers, replicas=replicas, vnodes=vnodes)
    me = rpc.roles(comm, n_servers)
    if not isinstance(replicas, int) or not 1 <= replicas <= n_servers:
        raise ValueError(f"replicas must be an integer from 1 to n_servers ({n_servers}), got {replicas!r}")
    ring = HashRing(range(n_servers), vnodes)

    if me.is_server:
        server = _Server()
        rpc.serve(comm, server.handlers(), clients=me.workers)
        mine = {"stats": {"keys": len(server.data), "bytes": sum(v.nbytes for v in server.data.values()),
                          "requests": server.requests, "down": server.down}}
    else:
        store = KVClient(comm, me.index, me.servers, ring, replicas)
        returned, failure = None, None
        try:
            returned = client_fn(store)
            pickle.dumps(returned)  # it travels to every rank: find out now, not in the allgather below
        except BaseException as error:  # also KeyboardInterrupt: the servers must hear "done" in any case
            failure = f"client {me.index} failed: {type(error).__name__}: {error}"
            returned = None
        for s in me.servers:
            rpc.call(comm, s, rpc.DONE)
        mine = {"returned": returned, "failure": failure}

    everyone = comm.allgather(mine)
    clients, servers = everyone[n_servers:], [part["stats"] for part in everyone[:n_servers]]
    failures = [part["failure"] for part in clients if part["failure"]]
    if failures:
        raise RuntimeError(failures[0])
    return KVResult([part["returned"] for part in clients], [s["keys"] for s in servers],
                    [s["bytes"] for s in servers], [s["requests"] for s in servers], [s["down"] for s in servers])
