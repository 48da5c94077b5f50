"""Lamport clocks over a real message trace: an order of events that every message respects.

    stamped = lamport_clocks(gather_trace(traced))   # the trace records of every rank, each with 'lamport'
    violations(stamped)                              # []: every receive is later than its send

Wall clocks of different machines disagree, so "rank 1 sent before rank 2 received" cannot be read
off timestamps. Lamport (CACM 1978) counts instead. Each rank keeps a counter and, at each event:

    a local event or a send        clock = clock + 1         (a message carries its send's clock)
    a receive of a message with m  clock = max(clock, m) + 1

so if event a happened before event b (a came first on the same rank, or a sent a message that b,
or an event after it, received), then C(a) < C(b). The reverse does not hold: two events with
C(a) < C(b) may be concurrent.

The events are the trace's records (syncml_lib.trace): a send happens at its record's start (when
the message leaves), a receive at its end (when the message is there: an Irecv posted early receives
only when it completes). A rank's events are taken in that time order; a tie keeps the record order,
so a Sendrecv sends before it receives. The k-th message from rank a to rank b with tag t is b's
k-th receive from a with tag t: MPI delivers messages between two ranks with one tag in order.

A trace that cannot be stamped is a ValueError, the same on every rank that stamps the same gathered
trace: a receive that no send in the trace matches; a receive whose message could only be sent after
the receive itself (a message from the future: the trace contradicts itself); a receive never
completed (end None). Cost: O(number of records).
"""
__all__ = ["lamport_tick", "lamport_clocks", "violations", "matched_messages"]


def lamport_tick(clock, received=None):
    """The clock after one event: clock + 1 for a local event or a send (received None); for the
    receive of a message stamped `received`, max(clock, received) + 1."""
    return clock + 1 if received is None else max(clock, received) + 1


def _describe(record):
    other = f"to rank {record['dest']}" if record["kind"] == "send" else f"from rank {record['source']}"
    return f"rank {record['rank']}'s {record['call']} (step {record['step']}) {other}, tag {record['tag']}"


def _events_by_rank(records):
    """{rank: [(index into records, record)] in event order}."""
    by_rank = {}
    for i, record in enumerate(records):
        if record["kind"] == "recv" and record["end"] is None:
            raise ValueError(f"{_describe(record)} never completed (its end is None): it received nothing, so it "
                             f"is no event; complete it with traced.Waitall or traced.Testall before stamping")
        by_rank.setdefault(record["rank"], []).append((i, record))
    for events in by_rank.values():
        events.sort(key=lambda event: (event[1]["start"] if event[1]["kind"] == "send" else event[1]["end"], event[0]))
    return by_rank


def matched_messages(records):
    """[(index of the send, index of the receive)] for every receive in records; a receive that no send
    matches is a ValueError. Sends may be left unmatched (a message the trace did not see received)."""
    events = [event for _, rank_events in sorted(_events_by_rank(records).items()) for event in rank_events]
    sends, taken, pairs = {}, {}, []
    for i, record in events:
        if record["kind"] == "send":
            sends.setdefault((record["source"], record["dest"], record["tag"]), []).append(i)
    for i, record in events:
        if record["kind"] != "recv":
            continue
        key = (record["source"], record["dest"], record["tag"])
        k = taken[key] = taken.get(key, -1) + 1
        if k >= len(sends.get(key, [])):
            raise ValueError(f"{_describe(record)} is receive number {k + 1} from rank {record['source']} with tag "
                             f"{record['tag']}, but the trace has only {len(sends.get(key, []))} such sends: no send "
                             f"matches it")
        pairs.append((sends[key][k], i))
    return pairs


def lamport_clocks(records):
    """A copy of each record with its Lamport clock under 'lamport', in the same order.

    Each rank's clock starts at 0; lamport_tick (looked up by name, so a learner's version can stand in)
    gives each event its clock, a receive only once its send has one."""
    by_rank = _events_by_rank(records)
    send_of = {receive: send for send, receive in matched_messages(records)}
    clocks = {rank: 0 for rank in by_rank}
    stamped = [dict(record) for record in records]
    position = {rank: 0 for rank in by_rank}
    progress = True
    while progress:
        progress = False
        for rank, events in by_rank.items():
            while position[rank] < len(events):
                i, record = events[position[rank]]
                if record["kind"] == "send":
                    clocks[rank] = lamport_tick(clocks[rank])
                else:
                    send = stamped[send_of[i]]
                    if "lamport" not in send:
                        break  # its message has not been stamped yet: another rank must go first
                    clocks[rank] = lamport_tick(clocks[rank], send["lamport"])
                stamped[i]["lamport"] = clocks[rank]
                position[rank] += 1
                progress = True
    stuck = [events[position[rank]] for rank, events in sorted(by_rank.items()) if position[rank] < len(events)]
    if stuck:
        i, record = stuck[0]
        send = records[send_of[i]]
        raise ValueError(f"{_describe(record)} receives a message from the future: its send, {_describe(send)}, "
                         f"comes after events of rank {send['rank']} that wait for this receive (the trace "
                         f"contradicts itself: no order of events lets every message be sent before it arrives)")
    return stamped


def violations(stamped):
    """What breaks happens-before in Lamport-stamped records, first first: a receive whose clock is not
    greater than its send's, or a rank whose clock does not grow from one event to the next."""
    problems = []
    for send, receive in matched_messages(stamped):
        if not stamped[receive]["lamport"] > stamped[send]["lamport"]:
            problems.append(f"{_describe(stamped[receive])} has clock {stamped[receive]['lamport']}, not greater "
                            f"than its send's, {_describe(stamped[send])}, clock {stamped[send]['lamport']}")
    for rank, events in sorted(_events_by_rank(stamped).items()):
        for (_, before), (_, after) in zip(events, events[1:]):
            if not after["lamport"] > before["lamport"]:
                problems.append(f"rank {rank}'s clock does not grow: {_describe(before)} has {before['lamport']}, the "
                                f"next event, {_describe(after)}, has {after['lamport']}")
                break
    return problems
