"""trace.TracedComm: the messages it records are the ones the algorithms send, to the byte."""
import functools

import numpy as np
import pytest

from syncml_lib.mpirun import run

RANKS = [1, 2, 3, 4, 5]


def lengths_for(p):
    """Lengths divisible by p, not divisible by p, and shorter than p."""
    return sorted({0, 1, 1000 * p, 1000 * p + 1, 1000 * p + p - 1, 3})


def chunk_sizes(n, p):
    """The ring's chunk sizes: n // p each, the first n % p chunks one element more."""
    return [n // p + (1 if i < n % p else 0) for i in range(p)]


def job(comm):
    from mpi4py import MPI

    from syncml_lib.allreduce import recursive_doubling_allreduce, ring_allreduce
    from syncml_lib.trace import TracedComm, gather_trace

    report = {"ring": {}}
    for dtype in ("float64", "float32"):
        for n in lengths_for(comm.size):
            traced = TracedComm(comm)
            x = np.full(n, comm.rank + 1, dtype=dtype)
            y = ring_allreduce(traced, x)
            right = np.array_equal(y, np.full(n, comm.size * (comm.size + 1) // 2, dtype=dtype))
            report["ring"][dtype, n] = dict(records=traced.records, sent=traced.bytes_sent(),
                                            received=traced.bytes_received(), right=right)

    traced = TracedComm(comm)
    recursive_doubling_allreduce(traced, np.ones(1000))
    report["recursive doubling sent"] = traced.bytes_sent()

    # Isend / Irecv around the ring, completed through traced.Waitall
    traced = TracedComm(comm)
    out, into = np.full(10, comm.rank, dtype=np.int64), np.empty(10, dtype=np.int64)
    requests = [traced.Irecv(into, source=(comm.rank - 1) % comm.size),
                traced.Isend(out, dest=(comm.rank + 1) % comm.size)]
    traced.Waitall(requests)
    report["nonblocking"] = dict(records=traced.records, got=into.tolist())
    report["gathered"] = gather_trace(traced)
    report["gathered at root"] = gather_trace(traced, root=0)
    report["forwards"] = (traced.rank, traced.size, traced.Get_size(), traced.allreduce(1, op=MPI.SUM))
    return report


@functools.cache
def reports(p):
    return run(job, p, timeout=60)


@pytest.mark.parametrize("p", RANKS)
def test_ring_sends_exactly_its_chunks(p):
    for (dtype, n), _ in reports(p)[0]["ring"].items():
        itemsize = np.dtype(dtype).itemsize
        c = chunk_sizes(n, p)
        total_sent = 0
        for rank, report in enumerate(reports(p)):
            case = report["ring"][dtype, n]
            assert case["right"], f"rank {rank}: wrong ring result for {dtype} n={n}"
            # reduce-scatter sends every chunk except (rank + 1) % p, the one this rank finishes with;
            # allgather sends every chunk except (rank + 2) % p, the last one it receives.
            expected = itemsize * (2 * n - c[(rank + 1) % p] - c[(rank + 2) % p])
            assert case["sent"] == expected, f"rank {rank}, {dtype} n={n}: sent {case['sent']} != {expected}"
            # what arrives is what the left neighbour sent: all chunks but rank's and (rank + 1)'s
            assert case["received"] == itemsize * (2 * n - c[rank] - c[(rank + 1) % p])
            sends = [r for r in case["records"] if r["kind"] == "send"]
            assert len(sends) == 2 * (p - 1)
            assert [r["step"] for r in sends] == list(range(2 * (p - 1)))
            assert all(r["dest"] == (rank + 1) % p and r["source"] == rank for r in sends)
            assert all(r["bytes"] in (itemsize * (n // p), itemsize * -(-n // p)) for r in sends)
            total_sent += case["sent"]
        # 2(p-1)/p * n * itemsize per rank on average: exactly 2(p-1) * n * itemsize in total
        assert total_sent == 2 * (p - 1) * n * itemsize


@pytest.mark.parametrize("p", RANKS)
def test_records_have_sane_fields(p):
    for rank, report in enumerate(reports(p)):
        for case in report["ring"].values():
            for record in case["records"]:
                assert record["rank"] == rank and record["call"] == "Sendrecv"
                assert 0 <= record["start"] <= record["end"]
            receives = [r for r in case["records"] if r["kind"] == "recv"]
            assert all(r["source"] == (rank - 1) % p and r["dest"] == rank for r in receives)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_recursive_doubling_sends_everything_log2_p_times(p):
    for report in reports(p):
        assert report["recursive doubling sent"] == int(np.log2(p)) * 1000 * 8


@pytest.mark.parametrize("p", RANKS)
def test_nonblocking_records_end_at_waitall(p):
    for rank, report in enumerate(reports(p)):
        case = report["nonblocking"]
        assert case["got"] == [(rank - 1) % p] * 10
        recv, send = case["records"]
        assert (recv["call"], recv["kind"], recv["source"], recv["dest"], recv["bytes"], recv["step"]) == \
               ("Irecv", "recv", (rank - 1) % p, rank, 80, 0)
        assert (send["call"], send["kind"], send["source"], send["dest"], send["bytes"], send["step"]) == \
               ("Isend", "send", rank, (rank + 1) % p, 80, 1)
        for record in (recv, send):
            assert record["end"] is not None and record["start"] <= record["end"]


@pytest.mark.parametrize("p", RANKS)
def test_gather_trace_and_forwarding(p):
    for rank, report in enumerate(reports(p)):
        assert [r["rank"] for r in report["gathered"]] == sorted([r for r in range(p) for _ in range(2)])
        assert report["gathered at root"] == (report["gathered"] if rank == 0 else None)
        assert report["forwards"] == (rank, p, p, p)
