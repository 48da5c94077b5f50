"""Write the course's records as a Chrome trace, the JSON that Perfetto (ui.perfetto.dev) and chrome://tracing open.

    everyone = gather_trace(traced, root=0)              # chapter 03: TracedComm's messages, all ranks
    write_chrome_trace("ring.json", everyone)            # then open ui.perfetto.dev and drop the file in
    write_chrome_trace("training.json", histories)       # chapter 06: one train() history per rank
    write_chrome_trace("tasks.json", sched.records)      # chapter 05b: EngineScheduler's attempts
    write_chrome_trace("ps.json", result.history)        # chapter 02: the parameter server's worker rows

What each kind of record becomes (the kind is told by its keys; times are the records' own seconds):

- messages (TracedComm, `gather_trace`): one process per rank, one slice per send and per receive, named
  by the call (Send, Recv, Sendrecv, Isend, Irecv) with its bytes, peer and tag; and one flow arrow per
  message, from its send to its receive. The n-th send from rank s to rank d with tag t is matched with
  the n-th receive on d from s with tag t (MPI delivers the messages of one sender, tag and communicator in
  order). A nonblocking call whose end was never stamped (completed outside traced.Waitall) gets a slice of
  zero length;
- training history (`train(...).history`, a list of them, one per rank): one process per rank, per step a
  "compute" slice and then a "communication" slice ending at the step's `time` (the history keeps each
  step's two durations and its end, not when the communication began: with bucketing, which overlaps them,
  the picture puts them one after the other);
- EngineScheduler.records: one process per engine, one slice per attempt, named by the task, with its
  attempt and outcome ("done", "raised", "engine died");
- the parameter server's history: one process per worker, per step a "pull" slice (start to pulled) and a
  "compute and push" slice (pulled to end).

Slices that overlap in time on one rank (a Sendrecv's send and receive, several Isends in flight) go to
separate rows of that rank ("lane 0", "lane 1", ...): the first lane free at the slice's start. The format
lets slices of one row only nest, and Perfetto draws overlapping ones wrongly (perfetto.dev/docs/faq, "Why
are overlapping events in JSON traces not displayed correctly?"); Perfetto opens this JSON format as a
legacy one (perfetto.dev/docs/getting-started/other-formats). Chrome's format: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU (Trace Event
Format; "X" complete events, "s"/"f" flow events, "M" metadata for the names).
"""
import json

__all__ = ["chrome_trace", "write_chrome_trace"]

MICROSECONDS = 1e6  # the format's time unit


def write_chrome_trace(path, records):
    """Write chrome_trace(records) to `path` as JSON; return the number of events written."""
    trace = chrome_trace(records)
    with open(path, "w") as out:
        json.dump(trace, out)
    return len(trace["traceEvents"])


def chrome_trace(records):
    """The trace as a dict {"traceEvents": [...], "displayTimeUnit": "ms"}: see the module docstring for
    what each kind of record becomes. `records`: a list of dicts of one kind, or for training histories a
    list with one history per rank."""
    records = list(records)
    if records and isinstance(records[0], (list, tuple)):  # one training history per rank
        slices, flows, name = _training(records), [], "rank"
    elif not records:
        slices, flows, name = [], [], "rank"
    else:
        keys = set(records[0])
        if {"kind", "source", "dest", "bytes"} <= keys:
            (slices, flows), name = _messages(records), "rank"
        elif {"task", "engine", "outcome"} <= keys:
            slices, flows, name = _attempts(records), [], "engine"
        elif {"worker", "step", "pulled"} <= keys:
            slices, flows, name = _ps_steps(records), [], "worker"
        elif {"step", "compute", "communication", "time"} <= keys:
            slices, flows, name = _training([records]), [], "rank"
        else:
            raise ValueError(f"records of an unknown kind (keys {sorted(keys)}): expected TracedComm's, a "
                             f"training history, EngineScheduler.records or a parameter server's history")
    events = _laid_out(slices, name)
    lane_of = {id(s): s["tid"] for s in events if s["ph"] == "X"}
    for message_id, (send, recv) in enumerate(flows):
        for slice_, phase in ((send, "s"), (recv, "f")):
            events.append(dict(ph=phase, id=message_id, name="message", cat="message", bp="e",
                               pid=slice_["pid"], tid=lane_of[id(slice_)], ts=slice_["ts"]))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _slice(owner, name, start, end, **args):
    start = float(start)
    end = start if end is None else float(end)
    return dict(ph="X", name=name, cat="syncml", pid=int(owner), ts=start * MICROSECONDS,
                dur=max(0.0, end - start) * MICROSECONDS, args=args)


def _messages(records):
    """Slices for TracedComm records, and (send slice, receive slice) for each message."""
    slices, sends, receives = [], {}, {}
    for r in sorted(records, key=lambda r: (r["rank"], r["step"], r["kind"] != "send")):
        peer = r["dest"] if r["kind"] == "send" else r["source"]
        s = _slice(r["rank"], f'{r["call"]} {r["kind"]}', r["start"], r["end"], bytes=r["bytes"],
                   peer=peer, tag=r["tag"], step=r["step"])
        slices.append(s)
        channel = (r["source"], r["dest"], r["tag"])
        (sends if r["kind"] == "send" else receives).setdefault(channel, []).append(s)
    flows = [pair for channel, sent in sends.items() for pair in zip(sent, receives.get(channel, []))]
    return slices, flows


def _training(histories):
    slices = []
    for rank, history in enumerate(histories):
        for row in history:
            end = row["time"]
            talk = row.get("communication") or 0.0
            work = row.get("compute") or 0.0
            slices.append(_slice(rank, "compute", end - talk - work, end - talk, step=row["step"],
                                 epoch=row.get("epoch")))
            slices.append(_slice(rank, "communication", end - talk, end, step=row["step"],
                                 bytes_sent=row.get("bytes_sent")))
    return slices


def _attempts(records):
    return [_slice(r["engine"], r["task"], r["start"], r["end"], attempt=r["attempt"], outcome=r["outcome"])
            for r in records]


def _ps_steps(records):
    slices = []
    for r in records:
        slices.append(_slice(r["worker"], "pull", r["start"], r["pulled"], step=r["step"],
                             read_clock=r.get("read_clock"), staleness=r.get("staleness")))
        slices.append(_slice(r["worker"], "compute and push", r["pulled"], r["end"], step=r["step"]))
    return slices


def _laid_out(slices, owner_name):
    """Each slice gets a lane (tid) of its owner where it overlaps nothing; plus the names of both."""
    events, lanes_of = [], {}
    for s in sorted(slices, key=lambda s: (s["pid"], s["ts"], s["dur"])):
        lanes = lanes_of.setdefault(s["pid"], [])   # per lane: when its last slice ends
        free = next((i for i, busy_until in enumerate(lanes) if busy_until <= s["ts"]), len(lanes))
        if free == len(lanes):
            lanes.append(0.0)
        lanes[free] = s["ts"] + s["dur"]
        s["tid"] = free
        events.append(s)
    for pid, lanes in sorted(lanes_of.items()):
        events.append(dict(ph="M", name="process_name", pid=pid, args=dict(name=f"{owner_name} {pid}")))
        events.append(dict(ph="M", name="process_sort_index", pid=pid, args=dict(sort_index=pid)))
        for lane in range(len(lanes)):
            events.append(dict(ph="M", name="thread_name", pid=pid, tid=lane, args=dict(name=f"lane {lane}")))
    return events
