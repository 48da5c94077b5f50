"""chrome_trace: the course's records as a Chrome trace (Perfetto, chrome://tracing): valid JSON in that
format, every message of a real run once with its bytes and an arrow from its send to its receive, and no
two slices of one row that overlap."""
import json

import numpy as np
import pytest

from syncml_lib.chrome_trace import chrome_trace, write_chrome_trace
from syncml_lib.mpirun import run


def traced_allreduces(comm, n):
    """Ring allreduce (Sendrecv) then the naive one (Send/Recv to rank 0 and back), traced; all records on rank 0."""
    from syncml_lib.allreduce import naive_allreduce, ring_allreduce
    from syncml_lib.trace import TracedComm, gather_trace

    traced = TracedComm(comm)
    x = np.arange(n, dtype=float) + comm.rank
    ring_allreduce(traced, x)
    naive_allreduce(traced, x)
    requests = [traced.Isend(x, dest=(comm.rank + 1) % comm.size, tag=7),   # two messages in flight at once
                traced.Isend(x[:1].copy(), dest=(comm.rank + 1) % comm.size, tag=8)]
    got = [np.empty(n), np.empty(1)]
    requests += [traced.Irecv(got[0], source=(comm.rank - 1) % comm.size, tag=7),
                 traced.Irecv(got[1], source=(comm.rank - 1) % comm.size, tag=8)]
    traced.Waitall(requests)
    return gather_trace(traced, root=0)


def slices(trace):
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def assert_valid_and_no_overlap(trace):
    """The format's required fields, JSON round trip, and within each (process, lane) no overlap."""
    assert json.loads(json.dumps(trace)) == trace and trace["displayTimeUnit"] == "ms"
    rows = {}
    for e in trace["traceEvents"]:
        assert e["ph"] in {"X", "M", "s", "f"} and isinstance(e["pid"], int), e
        if e["ph"] == "X":
            assert e["dur"] >= 0 and isinstance(e["tid"], int) and isinstance(e["name"], str), e
            rows.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for row, spans in rows.items():
        spans.sort()
        overlapping = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
        assert overlapping == [], (row, overlapping[:3])
    named = {(e["pid"], e.get("tid")) for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(rows) <= named, "every lane has a name"


@pytest.mark.parametrize("p", [2, 3, 4])
def test_every_message_of_a_real_run_appears_once_with_its_bytes_and_an_arrow_from_send_to_receive(p, tmp_path):
    records = run(traced_allreduces, p, 10, timeout=60)[0]
    path = tmp_path / "trace.json"
    assert write_chrome_trace(path, records) > 0
    trace = json.loads(path.read_text())
    assert_valid_and_no_overlap(trace)
    sends = [r for r in records if r["kind"] == "send"]
    # the run's messages, counted from the algorithms: ring 2(p-1) per rank, naive p-1 in and p-1 out, 2 Isends
    assert len(sends) == p * 2 * (p - 1) + 2 * (p - 1) + 2 * p
    send_slices = [e for e in slices(trace) if e["name"].endswith(" send")]
    recv_slices = [e for e in slices(trace) if e["name"].endswith(" recv")]
    assert sorted((e["pid"], e["args"]["peer"], e["args"]["tag"], e["args"]["bytes"]) for e in send_slices) == \
        sorted((r["source"], r["dest"], r["tag"], r["bytes"]) for r in sends)
    starts = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "s"}
    ends = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "f"}
    assert len(starts) == len(ends) == len(sends) and set(starts) == set(ends)
    by_place = {(e["pid"], e["tid"], e["ts"]): e for e in send_slices + recv_slices}
    for message_id, start in starts.items():
        send, recv = by_place[(start["pid"], start["tid"], start["ts"])], \
            by_place[(ends[message_id]["pid"], ends[message_id]["tid"], ends[message_id]["ts"])]
        assert send["name"].endswith(" send") and recv["name"].endswith(" recv")
        assert (send["args"]["peer"], recv["args"]["peer"]) == (recv["pid"], send["pid"])  # dest and source
        assert send["args"]["tag"] == recv["args"]["tag"] and send["args"]["bytes"] == recv["args"]["bytes"]
    lanes = {e["tid"] for e in slices(trace)}
    assert len(lanes) >= 2, "a Sendrecv's send and receive overlap: they need two lanes"


def test_engine_scheduler_records_training_histories_and_parameter_server_rows():
    attempts = [dict(task="load", engine=0, attempt=1, start=0.0, end=0.5, outcome="done"),
                dict(task="train", engine=1, attempt=1, start=0.1, end=0.3, outcome="engine died"),
                dict(task="train", engine=0, attempt=2, start=0.5, end=1.0, outcome="done")]
    trace = chrome_trace(attempts)
    assert_valid_and_no_overlap(trace)
    assert sorted((e["pid"], e["name"], e["args"]["attempt"]) for e in slices(trace)) == \
        [(0, "load", 1), (0, "train", 2), (1, "train", 1)]
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "engine 0", 1: "engine 1"}

    history = [dict(step=s, epoch=0, time=0.01 * (s + 1), compute=0.006, communication=0.003, bytes_sent=80)
               for s in range(3)]
    trace = chrome_trace([history, history])                       # one history per rank
    assert_valid_and_no_overlap(trace)
    compute = sorted((e["pid"], e["args"]["step"], round(e["ts"]), round(e["dur"])) for e in slices(trace)
                     if e["name"] == "compute")
    assert compute == [(rank, s, round(1e4 * (s + 1) - 9e3), 6000) for rank in (0, 1) for s in range(3)]

    rows = [dict(worker=w, step=s, read_clock=s, staleness=0, start=s, pulled=s + 0.25, end=s + 1.0)
            for w in (0, 1) for s in range(2)]
    trace = chrome_trace(rows)
    assert_valid_and_no_overlap(trace)
    assert len([e for e in slices(trace) if e["name"] == "pull"]) == 4

    with pytest.raises(ValueError, match="unknown kind"):
        chrome_trace([{"what": 1}])
