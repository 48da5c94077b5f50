"""Record every point-to-point message a communicator sends or receives.

    traced = TracedComm(comm)                      # collective: a Barrier lines up the clocks
    y = ring_allreduce(traced, x)                  # any code that takes a comm works unchanged
    traced.records[0]    # {'rank': 0, 'step': 0, 'call': 'Sendrecv', 'kind': 'send', 'source': 0,
                         #  'dest': 1, 'tag': 0, 'bytes': 8000, 'start': 0.0012, 'end': 0.0013}
    traced.bytes_sent()                            # 48000
    everyone = gather_trace(traced)                # all ranks' records, for a timeline plot

TracedComm forwards every attribute to the wrapped mpi4py communicator and times the buffer-based
point-to-point calls Send, Recv, Sendrecv, Isend and Irecv. Each call is one `step` (numbered from
0 on each rank) and adds one record per message: a Sendrecv adds a 'send' and a 'recv' record with
the same step. Times are time.perf_counter() seconds since the wrapper was made. Pickle-based calls
(send, recv, allgather, ...) and collectives are not recorded.

Isend and Irecv records get their `end` when the request completes in traced.Waitall(requests) or
traced.Testall(requests); requests completed some other way (MPI.Request.Waitall, req.Wait) keep
end=None. A receive's source, tag and bytes are those of the message that arrived (its status).
"""
import time

from mpi4py import MPI

__all__ = ["TracedComm", "gather_trace"]


def _nbytes(buf):
    """Bytes in a buffer argument: a numpy array, or a list/tuple [array, datatype] as mpi4py accepts."""
    if isinstance(buf, (list, tuple)):
        buf = buf[0]
    return memoryview(buf).nbytes


class TracedComm:
    """A communicator that records its point-to-point messages in self.records (a list of dicts)."""

    def __init__(self, comm):
        self.comm = comm
        self.records = []
        self.steps = 0
        self._pending = []  # (request, record) of Isend/Irecv not yet completed through Waitall
        comm.Barrier()
        self.t0 = time.perf_counter()

    def __getattr__(self, name):  # only called for what this class does not define itself
        return getattr(self.comm, name)

    def now(self):
        """Seconds since the wrapper was made (the clock of every record's start and end)."""
        return time.perf_counter() - self.t0

    def _record(self, call, kind, source, dest, tag, nbytes, start, end):
        record = dict(rank=self.comm.rank, step=self.steps, call=call, kind=kind, source=source,
                      dest=dest, tag=tag, bytes=nbytes, start=start, end=end)
        self.records.append(record)
        return record

    def Send(self, buf, dest, tag=0):
        start = self.now()
        self.comm.Send(buf, dest, tag)
        self._record("Send", "send", self.comm.rank, dest, tag, _nbytes(buf), start, self.now())
        self.steps += 1

    def Recv(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=None):
        status = MPI.Status() if status is None else status
        start = self.now()
        self.comm.Recv(buf, source, tag, status)
        self._record("Recv", "recv", status.Get_source(), self.comm.rank, status.Get_tag(),
                     status.Get_count(MPI.BYTE), start, self.now())
        self.steps += 1

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=MPI.ANY_SOURCE,
                 recvtag=MPI.ANY_TAG, status=None):
        status = MPI.Status() if status is None else status
        start = self.now()
        self.comm.Sendrecv(sendbuf, dest, sendtag, recvbuf, source, recvtag, status)
        end = self.now()
        self._record("Sendrecv", "send", self.comm.rank, dest, sendtag, _nbytes(sendbuf), start, end)
        self._record("Sendrecv", "recv", status.Get_source(), self.comm.rank, status.Get_tag(),
                     status.Get_count(MPI.BYTE), start, end)
        self.steps += 1

    def Isend(self, buf, dest, tag=0):
        start = self.now()
        request = self.comm.Isend(buf, dest, tag)
        self._pending.append((request, self._record("Isend", "send", self.comm.rank, dest, tag,
                                                    _nbytes(buf), start, None)))
        self.steps += 1
        return request

    def Irecv(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
        start = self.now()
        request = self.comm.Irecv(buf, source, tag)
        # source and bytes are known for sure only when the message has arrived: Waitall fills them in
        self._pending.append((request, self._record("Irecv", "recv", source, self.comm.rank, tag,
                                                    _nbytes(buf), start, None)))
        self.steps += 1
        return request

    def Waitall(self, requests):
        """MPI.Request.Waitall(requests), then stamp the end time of the traced ones among them."""
        statuses = [MPI.Status() for _ in requests]
        MPI.Request.Waitall(requests, statuses)
        self._stamp(requests, statuses)

    def Testall(self, requests):
        """MPI.Request.Testall(requests): True if all have completed, and then their end times are
        stamped (a waiting loop that must stay interruptible polls with this instead of Waitall)."""
        statuses = [MPI.Status() for _ in requests]
        if not MPI.Request.Testall(requests, statuses):
            return False
        self._stamp(requests, statuses)
        return True

    def _stamp(self, requests, statuses):
        end = self.now()
        waited = {id(request): status for request, status in zip(requests, statuses)}
        still_pending = []
        for request, record in self._pending:
            status = waited.get(id(request))
            if status is None:
                still_pending.append((request, record))
                continue
            record["end"] = end
            if record["kind"] == "recv":
                record["source"], record["tag"] = status.Get_source(), status.Get_tag()
                record["bytes"] = status.Get_count(MPI.BYTE)
        self._pending = still_pending

    def bytes_sent(self):
        """Total bytes this rank has sent since the wrapper was made."""
        return sum(r["bytes"] for r in self.records if r["kind"] == "send")

    def bytes_received(self):
        """Total bytes this rank has received since the wrapper was made."""
        return sum(r["bytes"] for r in self.records if r["kind"] == "recv")


def gather_trace(traced, root=None):
    """All ranks' records in one list, ordered by rank then step: on every rank, or only on root
    (the others get None) if root is given. Collective (one pickle-based allgather or gather)."""
    if root is None:
        per_rank = traced.comm.allgather(traced.records)
    else:
        per_rank = traced.comm.gather(traced.records, root=root)
        if per_rank is None:
            return None
    return [record for records in per_rank for record in records]
