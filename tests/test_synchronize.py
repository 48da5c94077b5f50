"""Chapter 01's library under real mpiexec with 1-5 ranks: shared_value (lost updates and their two fixes),
barrier (the price of a barrier), consistency (BSP/SSP/ASP over iteration clocks), clocks (Lamport).

References: update counts from the definition (W workers x rounds, one kept per round when everyone reads
first); E[max] of exponentials from a seeded simulation; the staleness bound read off each rank's own
trace (the messages it had received, by its own clock, when an iteration started); Lamport clocks
against the longest chain of events in the happens-before graph, and against a trace stamped by hand.
Timing enters only with wide margins (a straggler 10 times slower than the others)."""
import functools

import numpy as np
import pytest

from syncml_lib.barrier import expected_slowest, expected_wait, harmonic
from syncml_lib.clocks import lamport_clocks, matched_messages, violations
from syncml_lib.mpirun import run


# ----------------------------------------------------------------------------- shared_value

def updates_job(comm, method, rounds, **options):
    from syncml_lib.shared_value import run_shared_updates

    result = run_shared_updates(comm, method, rounds=rounds, **options)
    return result.value.tolist(), result.version, result.lost, result.failed_cas, result.requests, len(result.log)


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_overwrite_keeps_one_update_per_round_when_every_worker_reads_first(p):
    W, rounds = p - 1, 12
    reports = run(updates_job, p, "overwrite", rounds, timeout=60)
    assert all(report == reports[0] for report in reports)          # the same result on every rank
    value, version, lost, failed, requests, changes = reports[0]
    assert sum(value) == rounds and lost == rounds * (W - 1)       # 1 of the W updates of each round survives
    assert version == changes == rounds * W and requests == 2 * rounds * W   # every write was stored, over another
    if W > 1:
        assert lost > 0


@pytest.mark.parametrize("p", [2, 3, 4, 5])
@pytest.mark.parametrize("method", ["add", "cas"])
def test_adding_on_the_server_and_compare_and_set_lose_nothing(p, method):
    W, rounds = p - 1, 12
    reports = run(updates_job, p, method, rounds, timeout=60)
    assert all(report == reports[0] for report in reports)
    value, version, lost, failed, requests, changes = reports[0]
    assert value == [float(rounds)] * W and lost == 0 and version == rounds * W
    if method == "add":
        assert failed == 0 and requests == rounds * W
    else:  # the W compare-and-sets of a round carry one version: only one of them can store
        assert failed >= rounds * (W - 1) and requests == 2 * (rounds * W + failed)


def test_without_the_gate_every_update_is_accounted_for():
    value, version, lost, failed, requests, changes = run(updates_job, 4, "overwrite", 30, gate=False,
                                                          think=0.001, timeout=60)[0]
    assert all(0 <= v <= 30 for v in value) and lost == 90 - sum(value) and version == 90


def missing_key_job(comm):
    from syncml_lib.rpc import RunAborted
    from syncml_lib.shared_value import run_shared_updates

    try:
        run_shared_updates(comm, "cas", rounds=3, key="v")
        outcome = "finished"
    except RunAborted as error:
        outcome = str(error)
    again = run_shared_updates(comm, "cas", rounds=3)          # the same processes: a clean run
    return outcome, again.value.tolist()


@pytest.mark.parametrize("p", [2, 4])
def test_a_compare_and_set_on_a_missing_key_ends_the_run_on_every_rank(p):
    reports = run(missing_key_job, p, timeout=60)
    for outcome, again in reports:
        assert outcome.startswith("the server (rank 0): KeyError:") and "no value named 'v'" in outcome
        assert again == [3.0] * (p - 1)


def refused_job(comm, **arguments):
    from syncml_lib.shared_value import run_shared_updates

    try:
        run_shared_updates(comm, **arguments(comm.rank) if callable(arguments) else arguments)
    except ValueError as error:
        return str(error)
    return "no error"


def bad_arguments(case, rank):
    return {"method": dict(method="swap", rounds=3), "rounds": dict(method="add", rounds=3 + (rank == 2)),
            "zero": dict(method="add", rounds=0)}[case]


@pytest.mark.parametrize("case, p, message", [
    ("method", 3, "method must be one of 'overwrite', 'add', 'cas', got 'swap'"),
    ("rounds", 4, "run_shared_updates: rounds differ across ranks: 3 on ranks 0, 1, 3; 4 on rank 2"),
    ("zero", 3, "rounds must be a positive int, got 0"),
])
def test_bad_arguments_are_a_value_error_on_every_rank(case, p, message):
    def job(comm):
        from syncml_lib.shared_value import run_shared_updates

        try:
            run_shared_updates(comm, **bad_arguments(case, comm.rank))
        except ValueError as error:
            return str(error)
        return "no error"
    assert run(job, p, timeout=60) == [message] * p


def test_one_rank_leaves_no_worker():
    assert run(refused_job, 1, method="add", rounds=2, timeout=60) == [
        "1 server on 1 rank leaves no worker: run on at least 2 ranks"]


def failing_update(store, key, delta):
    if store.round == 2 and store.comm.rank == 2:
        raise ZeroDivisionError("worker 1's own bug")
    store.add(key, delta)


def failing_worker_job(comm):
    from syncml_lib import shared_value
    from syncml_lib.rpc import RunAborted

    shared_value.add_update, original = failing_update, shared_value.add_update
    try:
        shared_value.run_shared_updates(comm, "add", rounds=5)
    except RunAborted as error:
        return str(error)
    finally:
        shared_value.add_update = original
    return "finished"


def test_a_worker_that_raises_ends_the_run_on_every_rank_with_its_error():
    assert run(failing_worker_job, 4, timeout=60) == [
        "worker 1 (rank 2) failed in round 2: ZeroDivisionError: worker 1's own bug"] * 4


# ----------------------------------------------------------------------------- barrier

def test_harmonic_numbers_and_the_expected_slowest_against_a_seeded_simulation():
    assert harmonic(0) == 0 and harmonic(1) == 1 and harmonic(2) == 1.5 and abs(harmonic(4) - 25 / 12) < 1e-15
    rng = np.random.default_rng(0)
    for workers in (1, 2, 5, 16):
        draws = rng.exponential(2.0, size=(200_000, workers))
        assert abs(draws.max(axis=1).mean() - expected_slowest(workers, 2.0)) < 0.01 * expected_slowest(workers, 2.0)
        waits = draws.max(axis=1, keepdims=True) - draws
        assert abs(waits.mean() - expected_wait(workers, 2.0)) < 0.02 * 2.0


def barrier_job(comm, delays_of):
    from syncml_lib.barrier import run_barrier_steps

    steps = run_barrier_steps(comm, delays_of(comm.rank, comm.size))
    return steps.delays, steps.waits, steps.step_times


def staggered(rank, size, steps=6):
    """At step t the rank (t mod p) is the slowest, by at least 6 ms."""
    return [0.002 + 0.006 * ((rank - t) % size) for t in range(steps)]


@pytest.mark.parametrize("p", [1, 3, 4, 5])
def test_every_barrier_step_lasts_as_long_as_its_slowest_rank_and_the_slowest_waits_least(p):
    reports = run(barrier_job, p, staggered, timeout=60)
    delays, waits, step_times = reports[0]
    assert all(np.array_equal(step_times, r[2]) for r in reports)
    assert np.array_equal(delays, [staggered(r, p) for r in range(p)])
    assert (step_times >= delays.max(axis=0) - 1e-4).all() and (waits >= 0).all()
    for t in range(delays.shape[1]):
        slowest = int(np.argmax(delays[:, t]))
        others = [r for r in range(p) if r != slowest]
        if others:  # the others wait for it: at least 6 ms minus scheduling noise, it hardly at all
            assert all(waits[r, t] > waits[slowest, t] + 0.003 for r in others), (t, waits[:, t])


def test_delays_of_different_lengths_are_a_value_error_on_every_rank():
    def job(comm):
        from syncml_lib.barrier import run_barrier_steps

        try:
            run_barrier_steps(comm, [0.001] * (3 if comm.rank else 4))
        except ValueError as error:
            return str(error)
    assert run(job, 3, timeout=60) == ["run_barrier_steps: steps differ across ranks: 4 on rank 0; 3 on ranks 1, 2"] * 3


# ----------------------------------------------------------------------------- consistency and Lamport clocks

def clocked_job(comm, staleness, delays_of, iterations=6):
    from syncml_lib.consistency import run_clocked_workers

    return run_clocked_workers(comm, [delays_of(comm.rank, t) for t in range(iterations)], staleness)


def seeded_delays(rank, t):
    return float(np.random.default_rng([rank, t]).uniform(0.0005, 0.004))


def heard_by_own_clock(result, rank, at):
    """{peer: how many clock messages rank had taken in from it at time `at` (rank's own clock)}."""
    heard = {}
    for record in result.messages:
        if record["rank"] == rank and record["kind"] == "recv" and record["end"] <= at:
            heard[record["source"]] = heard.get(record["source"], 0) + 1
    return heard


@pytest.mark.parametrize("p", [1, 2, 3, 5])
@pytest.mark.parametrize("staleness", [0, 1, 2, None])
def test_no_iteration_starts_before_the_slowest_clock_allows_and_every_message_arrives(p, staleness):
    result = run(clocked_job, p, staleness, seeded_delays, timeout=60)[0]
    assert sorted((row["rank"], row["iteration"]) for row in result.iterations) == [
        (r, t) for r in range(p) for t in range(6)]
    for row in result.iterations:
        heard = heard_by_own_clock(result, row["rank"], row["start"])
        slowest = min((heard.get(q, 0) for q in range(p) if q != row["rank"]), default=None)
        if staleness is not None and slowest is not None:
            assert slowest >= row["iteration"] - staleness, row
        assert row["staleness"] is None or staleness is None or row["staleness"] <= staleness
    sends = [r for r in result.messages if r["kind"] == "send"]
    recvs = [r for r in result.messages if r["kind"] == "recv"]
    assert len(sends) == len(recvs) == p * (p - 1) * 6 and all(r["end"] is not None for r in recvs)
    assert len(matched_messages(result.messages)) == len(recvs)


def straggler(rank, t):
    return 0.010 if rank == 1 else 0.001


def test_asp_lets_the_fast_workers_finish_long_before_bsp_does():
    bsp, asp = (run(clocked_job, 3, s, straggler, timeout=60)[0] for s in (0, None))
    assert bsp.makespan >= 6 * 0.010
    for rank in (0, 2):  # BSP: every rank ends after the straggler's 6 iterations; ASP: after its own 6 ms
        assert bsp.of_rank(rank)[-1]["end"] >= 5 * 0.010
        assert asp.of_rank(rank)[-1]["end"] < 0.5 * bsp.of_rank(rank)[-1]["end"]
    assert max(row["staleness"] for row in asp.iterations) >= 3 and max(row["staleness"] for row in bsp.iterations) == 0


def longest_chains(records):
    """Per record, the number of events on the longest happens-before chain ending at it: a reference for
    Lamport clocks computed without lamport_tick (prev event on the same rank, or the matching send)."""
    by_rank = {}
    for i, r in enumerate(records):
        by_rank.setdefault(r["rank"], []).append(i)
    previous = {}
    for events in by_rank.values():
        events.sort(key=lambda i: (records[i]["start"] if records[i]["kind"] == "send" else records[i]["end"], i))
        previous.update({after: before for before, after in zip(events, events[1:])})
    send_of = {receive: send for send, receive in matched_messages(records)}

    @functools.lru_cache(maxsize=None)
    def chain(i):
        before = [chain(j) for j in (previous.get(i), send_of.get(i)) if j is not None]
        return 1 + max(before, default=0)
    return [chain(i) for i in range(len(records))]


@pytest.mark.parametrize("p, staleness", [(2, 0), (3, 1), (4, None), (5, 2)])
def test_lamport_clocks_of_a_real_trace_respect_every_message_and_are_the_longest_chains(p, staleness):
    result = run(clocked_job, p, staleness, seeded_delays, timeout=60)[0]
    stamped = lamport_clocks(result.messages)
    assert violations(stamped) == []
    assert [r["lamport"] for r in stamped] == longest_chains(result.messages)
    for send, receive in matched_messages(stamped):
        assert stamped[receive]["lamport"] > stamped[send]["lamport"]


def record(rank, kind, other, at, step, tag=0):
    source, dest = (rank, other) if kind == "send" else (other, rank)
    return dict(rank=rank, step=step, call="Send" if kind == "send" else "Recv", kind=kind, source=source, dest=dest,
                tag=tag, bytes=8, start=at, end=at)


def test_lamport_clocks_of_a_trace_stamped_by_hand():
    trace = [record(0, "send", 1, 0.0, 0), record(0, "recv", 2, 0.2, 1), record(1, "recv", 0, 0.5, 0),
             record(1, "send", 2, 0.6, 1), record(2, "send", 0, 0.1, 0), record(2, "recv", 1, 0.7, 1)]
    # rank 0 sends (1), rank 2 sends (1); rank 0 receives 2's message: max(1, 1) + 1 = 2; rank 1 receives
    # 0's: max(0, 1) + 1 = 2, then sends (3); rank 2 receives it: max(1, 3) + 1 = 4
    assert [r["lamport"] for r in lamport_clocks(trace)] == [1, 2, 2, 3, 1, 4]


def test_a_message_from_the_future_or_without_a_send_is_refused():
    future = [record(0, "recv", 1, 0.1, 0), record(0, "send", 1, 0.2, 1),
              record(1, "recv", 0, 0.3, 0), record(1, "send", 0, 0.4, 1)]
    with pytest.raises(ValueError, match="rank 0's Recv \\(step 0\\) from rank 1, tag 0 receives a message from "
                                         "the future: its send, rank 1's Send \\(step 1\\) to rank 0"):
        lamport_clocks(future)
    with pytest.raises(ValueError, match="rank 1's Recv \\(step 0\\) from rank 0, tag 5 is receive number 1 .* no send "
                                         "matches it"):
        lamport_clocks([record(0, "send", 1, 0.0, 0), record(1, "recv", 0, 0.1, 0, tag=5)])
    unfinished = dict(record(1, "recv", 0, 0.1, 0), call="Irecv", end=None)
    with pytest.raises(ValueError, match="never completed"):
        lamport_clocks([record(0, "send", 1, 0.0, 0), unfinished])
    stamped = lamport_clocks([record(0, "send", 1, 0.0, 0), record(1, "recv", 0, 0.1, 0)])
    stamped[1]["lamport"] = 1  # as a receive that forgot the + 1 would have it
    assert violations(stamped) == ["rank 1's Recv (step 0) from rank 0, tag 0 has clock 1, not greater than its "
                                   "send's, rank 0's Send (step 0) to rank 1, tag 0, clock 1"]


def corrupted_trace_job(comm):
    from syncml_lib.clocks import lamport_clocks
    from syncml_lib.consistency import run_clocked_workers

    records = run_clocked_workers(comm, [0.001] * 3, staleness=0).messages
    first_send = next(i for i, r in enumerate(records) if r["kind"] == "send")
    try:
        lamport_clocks(records[:first_send] + records[first_send + 1:])
    except ValueError as error:
        return str(error)
    return "stamped"


def test_a_trace_missing_a_send_is_the_same_error_on_every_rank():
    reports = run(corrupted_trace_job, 3, timeout=60)
    assert len(set(reports)) == 1 and "no send matches it" in reports[0]


def test_bad_delays_or_staleness_are_a_value_error_on_every_rank():
    def job(comm):
        from syncml_lib.consistency import run_clocked_workers

        messages = []
        for delays, staleness in (([0.001] * (2 + comm.rank), 0), ([0.001], -1), ([-1.0 if comm.rank == 2 else 0.0], 0)):
            try:
                run_clocked_workers(comm, delays, staleness)
                messages.append("no error")
            except ValueError as error:
                messages.append(str(error))
        return messages
    reports = run(job, 3, timeout=60)
    for rank, (lengths, negative, backwards) in enumerate(reports):
        assert lengths == "run_clocked_workers: iterations differ across ranks: 2 on rank 0; 3 on rank 1; 4 on rank 2"
        assert negative == "run_clocked_workers: staleness must be an int >= 0 or None (ASP), got -1"
        assert backwards == "run_clocked_workers: on rank 2, delays must be a 1-D array of seconds >= 0"


def test_the_makespan_floor_of_bsp_is_the_sum_of_the_slowest_and_of_asp_the_busiest_rank():
    from syncml_lib.consistency import makespan_floor

    delays = np.array([[1.0, 5.0, 1.0], [4.0, 1.0, 1.0], [1.0, 1.0, 3.0]])
    assert makespan_floor(delays, 0) == 4 + 5 + 3                          # every iteration waits for its slowest
    assert makespan_floor(delays, None) == max(delays.sum(axis=1))         # nobody waits
    # s = 1: rank 0 starts iteration 2 once everyone has done iteration 0 (by 4): max(6, 4) + 1 = 7; rank 2
    # starts iteration 2 at max(2, 4) = 4 and ends at 7; rank 1 ends at 6
    assert makespan_floor(delays, 1) == 7
    assert makespan_floor(delays, 0) >= makespan_floor(delays, 1) >= makespan_floor(delays, None)
