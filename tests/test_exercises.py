"""The exercise checks: they pass the solutions on several rank counts and name each classic mistake.

Every mpiexec rank of a check run here imports this module, to unpickle the wrong answers defined in it:
keep its imports light (nbformat alone costs a second, its JSON-schema validator, in every rank). The
generator's tests are in test_exercise_generator.py; that each check fails the unfinished stub is shown
on the committed exercise notebooks, in test_grade.py."""
import inspect
import re
import sys

import numpy as np
import pytest

from syncml_lib import checks
from helpers import ROOT

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


# every exercise: (notebook, function, its check, rank counts for the solution)
EXERCISES = [
    ("00_setup_and_tour", "global_mean", checks.check_global_mean, (1, 3, 4)),
    ("01_why_synchronize", "lamport_tick", checks.check_lamport_tick, (1, 3, 5)),
    ("01_why_synchronize", "cas_update", checks.check_cas_update, (2, 3, 5)),
    ("01_why_synchronize", "expected_wait", checks.check_expected_wait, (1, 3, 4)),
    ("02_parameter_server", "may_read", checks.check_ssp_rule, (2, 4)),
    ("02_parameter_server", "momentum_update", checks.check_momentum, (2, 4)),
    ("02_parameter_server", "shard", checks.check_shard, (2, 4)),
    ("03_allreduce", "my_reduce_scatter", checks.check_ring_reduce_scatter, (1, 3, 4, 5)),
    ("03_allreduce", "my_allgather", checks.check_ring_allgather, (1, 3, 4, 5)),
    ("03_allreduce", "my_recursive_doubling", checks.check_recursive_doubling, (1, 2, 4)),
    ("04_data_storage", "scatter_rows", checks.check_scatter_rows, (2, 3, 4)),
    ("04_data_storage", "epoch_indices", checks.check_epoch_indices, (2, 3, 4)),
    ("04_data_storage", "ring_owners", checks.check_ring_owners, (2, 3, 4)),
    ("05_task_scheduling", "guided_chunk", checks.check_guided_chunk, (2, 4)),
    ("05_task_scheduling", "expired_leases", checks.check_expired_leases, (2, 4)),
    ("05_task_scheduling", "record_result", checks.check_record_result, (2, 4)),
    ("05_task_scheduling", "factoring_chunks", checks.check_factoring_chunks, (2, 4)),
    ("05b_engines_that_die", "ready_tasks", checks.check_ready_tasks, ()),      # in the kernel, on engines
    ("05b_engines_that_die", "requeue_lost", checks.check_requeue_lost, ()),    # of its own: no ranks
    ("06_data_parallel_training", "weighted_average", checks.check_weighted_average, (1, 2, 3, 4)),
    ("06_data_parallel_training", "average_parameters", checks.check_average_parameters, (1, 2, 3, 4)),
    ("06_data_parallel_training", "assign_buckets", checks.check_assign_buckets, (1, 3, 4)),
    ("07_performance_and_open_problems", "topk_with_error_feedback", checks.check_topk_error_feedback, (1, 4)),
    ("07_performance_and_open_problems", "pairwise_masks", checks.check_pairwise_masks, (1, 2, 3, 5)),
    ("07_performance_and_open_problems", "split_nodes", checks.check_split_nodes, (1, 3, 4, 5)),
]


def test_every_solution_notebook_has_its_exercises_listed_here():
    listed = {notebook for notebook, *_ in EXERCISES}
    assert listed == {path.stem for path in SOLUTIONS}


def test_every_check_gives_up_after_the_one_time_limit_the_readme_states():
    limits = {check.__name__: inspect.signature(check).parameters["timeout"].default for *_, check, _ in EXERCISES}
    assert set(limits.values()) == {checks.TIMEOUT}, limits
    assert f"gives up after {checks.TIMEOUT} s" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("notebook, name, check, ranks", EXERCISES, ids=[e[1] for e in EXERCISES])
def test_each_check_passes_the_solution(notebook, name, check, ranks):
    solution = exercise_functions(f"solution:{notebook}.ipynb")[name]
    for n in ranks:
        check(solution, n=n)
    if not ranks:
        check(solution)


@pytest.mark.parametrize("notebook, name, check, ranks", EXERCISES, ids=[e[1] for e in EXERCISES])
def test_each_check_fails_the_unfinished_exercise_saying_it_is_not_written(notebook, name, check, ranks):
    """The committed exercise's stub, as the learner first finds it, fails its check (and says why). The rest
    of each exercise notebook is its solution's (test_exercise_generator), which test_grade runs end to end;
    so the exercise notebooks themselves need not run again (#24) but one, graded there."""
    stub = exercise_functions(f"exercise:{notebook}.ipynb")[name]
    with pytest.raises(checks.CheckFailed, match="NotImplementedError: the exercise is not written yet"):
        check(stub, n=max(ranks)) if ranks else check(stub)


def exercise_functions(name):
    """Define the functions of an exercise (or solution) notebook's answer cells, as a learner would."""
    import nbformat  # here, not at the top: see the module's docstring

    folder = "exercises" if name.startswith("exercise:") else "solutions"
    nb = nbformat.read(ROOT / folder / name.split(":")[1], as_version=4)
    namespace = {"__name__": "learner_notebook", "np": np}
    for cell in nb.cells:
        if cell.cell_type == "code" and "def " in cell.source and "cluster" not in cell.source:
            exec(cell.source, namespace)
    return namespace


def mean_of_means(comm, local_values):
    """The classic wrong answer: average the ranks' own means (wrong for uneven counts)."""
    means = comm.allgather(local_values.mean() if local_values.size else 0.0)
    return float(np.mean(means))


def test_global_mean_check_names_rank_trial_and_values_of_a_wrong_answer():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_global_mean(mean_of_means, n=3)
    message = str(info.value)
    first_inputs = checks.global_mean_inputs(0, 3)
    lengths = [len(v) for v in first_inputs]
    assert len(set(lengths)) > 1 and 0 not in lengths, "trial 0: uneven lengths, no empty rank"
    assert f"rank 0: trial 0 (lengths by rank {lengths}): returned" in message
    wrong = np.mean([v.mean() for v in first_inputs])
    expected = np.concatenate(first_inputs).mean()
    assert f"returned {wrong:.6g}, expected {expected:.6g}" in message


def hangs_on_rank_one(comm, local_values):
    if comm.rank != 1:
        comm.Barrier()
    return 0.0


def test_a_deadlocking_answer_fails_the_check_within_its_timeout():
    with pytest.raises(checks.CheckFailed, match="ranks 0, 1: did not finish within 2s"):
        checks.check_global_mean(hangs_on_rank_one, n=2, timeout=2)


# ---------------------------------------------------------------- chapter 01

@pytest.mark.parametrize("rule, message", [
    (lambda clock, received=None: clock + 1 if received is None else max(clock, received),
     "lamport_tick(clock=3, received=7) returned 7, expected 8: you forgot the + 1"),
    (lambda clock, received=None: clock + 1,
     "lamport_tick(clock=3, received=7) returned 4, expected 8: you ignored the message's stamp"),
    (lambda clock, received=None: clock + 1 if received is None else received + 1,
     "lamport_tick(clock=9, received=2) returned 3, expected 10: you took the message's stamp + 1 and ignored your own"),
    (lambda clock, received=None: float(clock + 1),
     "lamport_tick(clock=0, received=None) returned 1.0, a float; a Lamport clock is a whole number"),
])
def test_lamport_check_names_each_classic_mistake(rule, message):
    with pytest.raises(checks.CheckFailed, match=re.escape(message)):
        checks.check_lamport_tick(rule, n=2)


def lamport_right_only_on_the_table(clock, received=None):
    if received is None:
        return clock + 1
    return max(clock, received) + 1 if (clock, received) in {(3, 7), (9, 2), (4, 4)} else max(clock, received)


def test_lamport_check_stamps_a_real_trace_and_names_the_first_broken_message():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_lamport_tick(lamport_right_only_on_the_table, n=3)
    message = str(info.value)
    assert "ranks 0, 1, 2: on the trace of a real run_clocked_workers on 3 ranks (48 message records), your clocks " \
           "break happens-before: rank " in message
    assert re.search(r"Irecv \(step \d+\) from rank \d, tag 11 has clock (\d+), not greater than its send's, "
                     r"rank \d's Isend \(step \d+\) to rank \d, tag 11, clock \1", message), message


def cas_without_retry(store, key, delta):
    value, version = store.read(key)
    store.compare_and_set(key, value + delta, version)


def cas_with_write(store, key, delta):
    value, _ = store.read(key)
    store.write(key, value + delta)


def cas_with_a_stale_version(store, key, delta):
    value, version = store.read(key)
    while not store.compare_and_set(key, value + delta, version):
        pass


def cas_with_a_guessed_version(store, key, delta):
    value, version = store.read(key)
    store.compare_and_set(key, value + delta, version + 1)


def cas_with_the_first_value(store, key, delta):
    first, _ = store.read(key)
    while True:
        _, version = store.read(key)
        if store.compare_and_set(key, first + delta, version):
            return


def cas_that_never_returns(store, key, delta):
    while True:
        value, version = store.read(key)
        store.compare_and_set(key, value + delta, version)


def cas_that_reads_once_more_first(store, key, delta):
    store.read(key)                       # harmless: a correct answer
    while True:
        value, version = store.read(key)
        if store.compare_and_set(key, value + delta, version):
            return


def test_cas_check_passes_a_right_answer_that_reads_once_more():
    checks.check_cas_update(cas_that_reads_once_more_first, n=3)


@pytest.mark.parametrize("update, message", [
    (cas_without_retry, "your compare-and-set failed (another worker wrote after your read), stored nothing, and "
                        "your function returned: read again and retry until a compare-and-set returns True. Your calls: "
                        "read() -> ([0.0, 0.0], version 0); compare_and_set([1.0, 0.0], version 0) -> False"),
    (cas_with_write, "you called store.write, which stores whatever it is sent: the last writer wins"),
    (cas_with_a_stale_version, "compare_and_set failed 50 times in a row, each with version 0: after a failure, read "
                               "again"),
    (cas_with_a_guessed_version, "your compare-and-set passed version 1, but the read before it returned version 0: "
                                 "it stored [1.0, 0.0] over the other worker's update"),
    (cas_with_the_first_value, "your compare-and-set stored [1.0, 0.0], but the read before it returned [0.0, 1.0]: "
                               "compute the new value from the latest read"),
    (cas_that_never_returns, "your function made 100 calls to the store and had not returned: after a "
                             "compare-and-set that returned True, return. Your calls: read() -> ([0.0, 0.0], version 0); "
                             "compare_and_set([1.0, 0.0], version 0) -> False; read() -> ([0.0, 1.0], version 1); "
                             "compare_and_set([1.0, 1.0], version 1) -> True; read() -> ([1.0, 1.0], version 2); "
                             "compare_and_set([2.0, 1.0], version 2) -> True; ... (100 calls in all)"),
])
def test_cas_check_names_each_classic_mistake(update, message):
    with pytest.raises(checks.CheckFailed, match=re.escape(message)):
        checks.check_cas_update(update, n=3)


def cas_in_two_attempts(store, key, delta):
    """Right on the first trial (one conflict, then a success), but it always makes two compare-and-sets:
    in a real run a first one that stores is followed by a second that stores the update again."""
    for attempt in range(2):
        value, version = store.read(key)
        store.compare_and_set(key, value + delta, version)


def test_cas_check_runs_the_update_inside_a_real_server_and_counts_every_workers_updates():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_cas_update(cas_in_two_attempts, n=4)
    assert re.search(r"ranks 0, 1, 2, 3: a real run_shared_updates\('cas', rounds=8\) on 4 ranks, every worker reading "
                     r"before any writes: worker \d \(rank \d\) made 8 updates and the final value holds \d+: (some "
                     r"counted twice; return once a compare-and-set has returned True|\d+ of its updates were lost; a "
                     r"compare-and-set that returns False stored nothing)", str(info.value)), str(info.value)


@pytest.mark.parametrize("formula, message", [
    (lambda n, mean: sum(1 / k for k in range(1, n + 1)) * mean, "returned 0.01, expected 0: that is E[max], the whole step"),
    (lambda n, mean: (n - 1) * mean, "expected_wait(n_workers=2, mean=0.01) returned 0.01, expected 0.005: that is one "
                                     "mean, which (W - 1) mean and H_(W-1) mean both give at W = 2"),
    (lambda n, mean: sum(1 / k for k in range(1, n + 1)) - 1, "returned 0.5, expected 0.005: that is H_W - 1 without "
                                                             "the mean: multiply by mean = 0.01"),
    (lambda n, mean: float(np.log(n)) * mean, "returned 0.00693147, expected 0.005: ln(W) mean is H_W - 1 only roughly"),
    (lambda n, mean: (n - 1) / 2 * mean, "expected_wait(n_workers=4, mean=0.02) returned 0.03, expected 0.0216667: that is "
                                         "(W - 1)/2 mean, as if the workers finished one mean apart"),
])
def test_expected_wait_check_names_each_classic_mistake(formula, message):
    with pytest.raises(checks.CheckFailed, match=re.escape(message)):
        checks.check_expected_wait(formula, n=2)


def wait_right_only_on_the_table(n, mean):
    table = {1: 0.0, 2: 0.5, 4: 1 / 2 + 1 / 3 + 1 / 4, 8: sum(1 / k for k in range(2, 9))}
    return table[n] * mean if n in table else (n - 1) * mean


def test_expected_wait_check_compares_with_a_seeded_run_on_the_ranks():
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: a seeded run of 20,000 barrier steps on 3 ranks .* "
                                                 r"waited 8\.\d+ ms on average .* expected_wait\(3, 0\.01\) = 20\.000 ms"):
        checks.check_expected_wait(wait_right_only_on_the_table, n=3)


# ---------------------------------------------------------------- chapter 03

def reduce_scatter_that_overwrites(comm, chunks):
    """Receives into the chunk instead of adding to it: the classic ring that does not reduce."""
    rank, p = comm.rank, comm.size
    for step in range(p - 1):
        comm.Sendrecv(chunks[(rank - step) % p], dest=(rank + 1) % p,
                      recvbuf=chunks[(rank - step - 1) % p], source=(rank - 1) % p)


def test_reduce_scatter_check_names_the_first_wrong_step():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_ring_reduce_scatter(reduce_scatter_that_overwrites, n=4)
    message = str(info.value)
    # rank 0 sends its own chunk 0 at step 0 (right), then at step 1 chunk 3, which should by then hold
    # ranks 3 and 0 summed, but holds only what rank 3 sent: the first wrong message is step 1.
    assert "rank 0: length 12: chunks[1] should end as the sum over all ranks, but its element" in message
    assert "First wrong message: step 1: sent" in message
    assert "expected chunk 3 summed over ranks [0, 3]" in message


def recursive_doubling_that_sends_its_own_x(comm, x):
    total = x.copy()
    for k in range(comm.size.bit_length() - 1):
        partner = comm.rank ^ (1 << k)
        incoming = np.empty_like(x)
        comm.Sendrecv(x, dest=partner, recvbuf=incoming, source=partner)  # should send the running sum
        total += incoming
    return total


def test_recursive_doubling_check_names_the_first_wrong_step():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_recursive_doubling(recursive_doubling_that_sends_its_own_x, n=4)
    message = str(info.value)
    assert "First wrong message: step 1: sent" in message and "expected the sum over ranks [0, 1]" in message


def allgather_that_copies_the_wrong_chunk(comm, chunks):
    rank, p = comm.rank, comm.size
    for step in range(p - 1):
        comm.Sendrecv(chunks[(rank + 1) % p], dest=(rank + 1) % p,  # always sends the same chunk
                      recvbuf=chunks[(rank - step) % p], source=(rank - 1) % p)


def test_allgather_check_names_the_first_wrong_step():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_ring_allgather(allgather_that_copies_the_wrong_chunk, n=3)
    assert "First wrong message: step 1: sent" in str(info.value)


def test_recursive_doubling_check_refuses_a_rank_count_that_is_not_a_power_of_two():
    solution = exercise_functions("solution:03_allreduce.ipynb")["my_recursive_doubling"]
    with pytest.raises(checks.CheckFailed, match="power-of-two number of ranks, not 3"):
        checks.check_recursive_doubling(solution, n=3)


def mean_with_two_collectives(comm, local_values):
    total = comm.allreduce(float(local_values.sum()))
    count = comm.allreduce(local_values.size)
    return total / count


def test_global_mean_check_counts_the_collectives():
    with pytest.raises(checks.CheckFailed, match=r"made 2 collective calls \(allreduce, allreduce\); the exercise asks for exactly one"):
        checks.check_global_mean(mean_with_two_collectives, n=2)


def reduce_scatter_that_rebinds_the_list(comm, chunks):
    """Right arithmetic, but `chunks[i] = ...` replaces list entries: the caller's buffer never changes."""
    rank, p = comm.rank, comm.size
    for step in range(p - 1):
        incoming = np.empty_like(chunks[(rank - step - 1) % p])
        comm.Sendrecv(chunks[(rank - step) % p], dest=(rank + 1) % p, recvbuf=incoming, source=(rank - 1) % p)
        chunks[(rank - step - 1) % p] = chunks[(rank - step - 1) % p] + incoming


def test_reduce_scatter_check_insists_on_working_in_place():
    with pytest.raises(checks.CheckFailed, match="replaced entries of the list `chunks`"):
        checks.check_ring_reduce_scatter(reduce_scatter_that_rebinds_the_list, n=3)


def allgather_with_blocking_send(comm, chunks):
    """Correct for small chunks, deadlocks for large ones: every rank sends before it receives."""
    rank, p = comm.rank, comm.size
    for step in range(p - 1):
        comm.Send(chunks[(rank + 1 - step) % p], dest=(rank + 1) % p)
        comm.Recv(chunks[(rank - step) % p], source=(rank - 1) % p)


def test_ring_checks_refuse_blocking_sends_that_deadlock_at_scale():
    with pytest.raises(checks.CheckFailed, match="used a blocking comm.Send"):
        checks.check_ring_allgather(allgather_with_blocking_send, n=3)


def recursive_doubling_with_wrong_partner(comm, x):
    total = x.copy()
    for k in range(comm.size.bit_length() - 1):
        partner = comm.rank ^ k  # should be comm.rank ^ (1 << k): at k = 0 each rank talks to itself
        incoming = np.empty_like(x)
        comm.Sendrecv(total, dest=partner, recvbuf=incoming, source=partner)
        total += incoming
    return total


def test_recursive_doubling_check_says_when_only_the_destination_is_wrong():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_recursive_doubling(recursive_doubling_with_wrong_partner, n=4)
    assert "rank 0: length 12:" in str(info.value)
    assert "step 0: sent the right data (the sum over ranks [0]) to rank 0, but it should go to rank 1" in str(info.value)


# ---------------------------------------------------------------- chapter 02

def too_strict(step, clock, staleness):
    return clock > step - staleness


def too_loose(step, clock, staleness):
    return clock >= step - staleness - 1


def test_ssp_check_explains_a_rule_that_blocks_too_much_or_too_little():
    with pytest.raises(checks.CheckFailed, match=r"may_read\(step=0, clock=0, staleness=0\) returned False, expected True"):
        checks.check_ssp_rule(too_strict, n=3)
    with pytest.raises(checks.CheckFailed, match=r"may_read\(step=1, clock=0, staleness=0\) returned True, expected False: "
                                                 r"the worker would miss the updates of 1 step"):
        checks.check_ssp_rule(too_loose, n=3)


def momentum_that_returns(param, velocity, grad, lr, momentum):
    return param - lr * (momentum * velocity + grad)


def momentum_in_the_wrong_order(param, velocity, grad, lr, momentum):
    param -= lr * velocity  # uses the old velocity
    velocity *= momentum
    velocity += grad


def momentum_that_reassigns(param, velocity, grad, lr, momentum):
    velocity = momentum * velocity + grad  # a new local array: the server's velocity stays 0
    param -= lr * velocity


def test_momentum_check_names_the_step_and_the_value():
    with pytest.raises(checks.CheckFailed, match="update param and velocity in place"):
        checks.check_momentum(momentum_that_returns, n=2)
    with pytest.raises(checks.CheckFailed, match=r"rank 0: step 0: param\[\d\] is .*, expected .* \(= previous param - lr"):
        checks.check_momentum(momentum_in_the_wrong_order, n=2)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1: step 0: velocity is unchanged after your call: update param "
                                                 r"and velocity in place .* `velocity = ...` only rebinds a local name"):
        checks.check_momentum(momentum_that_reassigns, n=2)


def overlapping_shards(flat, n_servers):
    size = -(-len(flat) // n_servers)
    return [flat[s * size:(s + 1) * size + 1] for s in range(n_servers)]


def unbalanced_shards(flat, n_servers):
    size = -(-len(flat) // n_servers)  # ceil: the last server gets what is left
    return [flat[s * size:(s + 1) * size] for s in range(n_servers)]


def extras_at_the_end(flat, n_servers):
    """Balanced, but the last slices get the extra elements: not the rule every rank must follow."""
    size, extra = divmod(len(flat), n_servers)
    bounds = np.cumsum([0] + [size + (s >= n_servers - extra) for s in range(n_servers)])
    return [flat[bounds[s]:bounds[s + 1]] for s in range(n_servers)]


def test_shard_check_catches_overlap_and_imbalance():
    with pytest.raises(checks.CheckFailed, match=r"shard\(np.arange\(10\), 2\) gave slices of sizes \[6, 5\], 11 elements "
                                                 r"in all for 10: the slices overlap \(element 5"):
        checks.check_shard(overlapping_shards, n=3)
    with pytest.raises(checks.CheckFailed, match=r"shard\(np.arange\(10\), 3\) gave slices of sizes \[4, 4, 2\], "
                                                 r"expected \[4, 3, 3\]: the first len\(flat\) % n_servers"):
        checks.check_shard(unbalanced_shards, n=3)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: shard\(np.arange\(10\), 3\) gave slices of sizes "
                                                 r"\[3, 3, 4\], expected \[4, 3, 3\]"):
        checks.check_shard(extras_at_the_end, n=3)


# ---------------------------------------------------------------- chapter 04

def scatter_by_broadcast(comm, data, n, d):
    """The look-alike: everyone receives everything, then keeps its block."""
    from syncml_lib.data import block_range
    data = comm.bcast(data, root=0)
    block = block_range(n, comm.size, comm.rank)
    return data[block.start:block.stop].copy()


def scatter_with_row_displacements(comm, data, n, d):
    """Counts in elements, but displacements in rows: every rank after 0 gets rows from too early."""
    from mpi4py import MPI
    from syncml_lib.data import block_range
    blocks = [block_range(n, comm.size, r) for r in range(comm.size)]
    mine = np.empty((len(blocks[comm.rank]), d))
    send = [data, [len(b) * d for b in blocks], [b.start for b in blocks], MPI.DOUBLE] if comm.rank == 0 else None
    comm.Scatterv(send, mine, root=0)
    return mine


def scatter_that_broadcasts_only_the_counts(comm, data, n, d):
    from mpi4py import MPI
    from syncml_lib.data import block_range
    counts = comm.bcast([len(block_range(n, comm.size, r)) * d for r in range(comm.size)] if comm.rank == 0 else None)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    mine = np.empty((counts[comm.rank] // d, d))
    comm.Scatterv([data, counts, starts, MPI.DOUBLE] if comm.rank == 0 else None, mine, root=0)
    return mine


def scatter_on_root_only(comm, data, n, d):
    """Only root calls the collective: its small sends go out and nobody receives them."""
    from mpi4py import MPI
    from syncml_lib.data import block_range
    blocks = [block_range(n, comm.size, r) for r in range(comm.size)]
    mine = np.empty((len(blocks[comm.rank]), d))
    if comm.rank == 0:
        comm.Scatterv([data, [len(b) * d for b in blocks], [b.start * d for b in blocks], MPI.DOUBLE], mine, root=0)
    return mine


def scatter_with_counts_in_rows(comm, data, n, d):
    from mpi4py import MPI
    from syncml_lib.data import block_range
    blocks = [block_range(n, comm.size, r) for r in range(comm.size)]
    mine = np.zeros((len(blocks[comm.rank]), d))
    send = [data, [len(b) for b in blocks], [b.start * d for b in blocks], MPI.DOUBLE] if comm.rank == 0 else None
    comm.Scatterv(send, mine, root=0)
    return mine


def test_scatter_check_names_a_broadcast_and_wrong_displacements():
    with pytest.raises(checks.CheckFailed, match=r"ranks 2, 3: trial 0 \(10 rows of 3 on 4 ranks\): this rank received "
                                                 r"\d+ bytes through bcast: all 10 rows \(240 bytes\), to keep 2"):
        checks.check_scatter_rows(scatter_by_broadcast, n=4)
    checks.check_scatter_rows(scatter_that_broadcasts_only_the_counts, n=4)   # a small bcast is no broadcast of data
    with pytest.raises(checks.CheckFailed, match=r"ranks 1, 2, 3: trial 0 .* made the collective calls none on this "
                                                 r"rank; every rank must call comm.Scatterv .* Ranks \[0\] did call it"):
        checks.check_scatter_rows(scatter_on_root_only, n=4)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1: trial 0 .*: the first 3 values of this rank's block are right, "
                                                 r"value 3 is not: check the counts"):
        checks.check_scatter_rows(scatter_with_counts_in_rows, n=4)
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_scatter_rows(scatter_with_row_displacements, n=4)
    message = str(info.value)
    # rank 1 should start at row 3 (element 9) but starts at element 3, i.e. row 1 of the data
    assert "rank 1: trial 0 (10 rows of 3 on 4 ranks): row 0 of this rank's block should be row 3 of the data, got row 1" in message
    assert "check the displacements" in message and "rank 0:" not in message


def seeded_by_rank(n, size, rank, epoch, seed):
    order = np.random.default_rng([seed + rank, epoch]).permutation(n)
    return np.resize(order, -(-n // size) * size)[rank::size]


def same_every_epoch(n, size, rank, epoch, seed):
    order = np.random.default_rng(seed).permutation(n)
    return np.resize(order, -(-n // size) * size)[rank::size]


def without_padding(n, size, rank, epoch, seed):
    return np.array_split(np.random.default_rng([seed, epoch]).permutation(n), size)[rank]


def unseeded(n, size, rank, epoch, seed):
    return np.resize(np.random.permutation(n), -(-n // size) * size)[rank::size]


def ignores_the_seed(n, size, rank, epoch, seed):
    return np.resize(np.random.default_rng(epoch).permutation(n), -(-n // size) * size)[rank::size]


def seed_plus_epoch(n, size, rank, epoch, seed):
    return np.resize(np.random.default_rng(seed + epoch).permutation(n), -(-n // size) * size)[rank::size]


def pads_with_zeros(n, size, rank, epoch, seed):
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return np.pad(order, (0, -(-n // size) * size - n))[rank::size]


def test_sampler_check_catches_seeds_and_padding_that_do_not_vary():
    with pytest.raises(checks.CheckFailed, match=r"seeds 11 and 12 give the same order .*must depend on the seed"):
        checks.check_epoch_indices(ignores_the_seed, n=4)
    with pytest.raises(checks.CheckFailed, match=r"seed 12, epoch 0 gives the same order as seed 11, epoch 1"):
        checks.check_epoch_indices(seed_plus_epoch, n=4)
    with pytest.raises(checks.CheckFailed, match=r"the padding repeats items \[0\] in epochs 0 and 1"):
        checks.check_epoch_indices(pads_with_zeros, n=4)


def test_sampler_check_explains_each_classic_mistake():
    with pytest.raises(checks.CheckFailed, match=r"epoch 0, n=10: item \d+ is (visited by no rank|visited by ranks .*"
                                                 r"Seed it with seed and epoch, not rank)"):
        checks.check_epoch_indices(seeded_by_rank, n=4)
    with pytest.raises(checks.CheckFailed, match=r"epochs 0 and 1 \(n=10\) visit the items in the same order"):
        checks.check_epoch_indices(same_every_epoch, n=4)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2, 3: epoch 0, n=10: rank 2 got 2 indices, expected 3 = ceil\(n / size\)"):
        checks.check_epoch_indices(without_padding, n=4)
    with pytest.raises(checks.CheckFailed, match=r"two calls gave different indices"):
        checks.check_epoch_indices(unseeded, n=4)


def owners_without_wrapping(points, key_hash, replicas):
    owners = []
    for position, server in points:
        if position >= key_hash and server not in owners:
            owners.append(server)
    return owners[:replicas]


def owners_with_repeats(points, key_hash, replicas):
    import bisect
    start = bisect.bisect_left(points, (key_hash,))
    return [points[(start + i) % len(points)][1] for i in range(replicas)]


def test_ring_check_names_the_case_and_the_rule():
    with pytest.raises(checks.CheckFailed, match=r"key_hash=35, replicas=1\) returned \[\], expected \['a'\]: past the last "
                                                 r"point the ring wraps around"):
        checks.check_ring_owners(owners_without_wrapping, n=4)
    with pytest.raises(checks.CheckFailed, match=r"key_hash=5, replicas=2\) returned \['a', 'a'\], expected \['a', 'b'\]: "
                                                 r"a server with two points counts once"):
        checks.check_ring_owners(owners_with_repeats, n=4)


def wrong_then_right(comm, use_fresh_comm):
    """In one process, as on the notebook's engines: a check of an answer that leaves messages behind,
    then a check of the solution."""
    right = exercise_functions("solution:04_data_storage.ipynb")["scatter_rows"]
    if use_fresh_comm:
        return [checks.harness._in_fresh_comm(comm, checks.data._scatter_rows_on_rank, answer)
                for answer in (scatter_on_root_only, right)]
    return [checks.data._scatter_rows_on_rank(comm, answer) for answer in (scatter_on_root_only, right)]


def test_messages_a_wrong_answer_left_behind_do_not_fail_the_next_check():
    from syncml_lib.mpirun import run
    reports = run(wrong_then_right, 4, True, timeout=60)
    assert all(first for first, _ in reports[1:]) and all(second == [] for _, second in reports), reports


def test_without_a_fresh_comm_the_messages_left_behind_do_fail_the_next_check():
    """The control of the test above: on the caller's comm the same two checks, and the right answer fails."""
    from syncml_lib.mpirun import run
    reports = run(wrong_then_right, 4, False, timeout=60)
    assert all(first for first, _ in reports[1:]), reports
    assert any(second for _, second in reports), f"the right answer passed although stale messages were waiting: {reports}"


# ---------------------------------------------------------------- chapter 05

def test_task_checks_explain_the_classic_mistakes():
    import math
    with pytest.raises(checks.CheckFailed, match=r"guided_chunk\(10, 4, 1\) returned 2, expected 3: ceil\(10 / 4\) = 3"):
        checks.check_guided_chunk(lambda remaining, workers, least: min(remaining, max(least, remaining // workers)), n=3)
    with pytest.raises(checks.CheckFailed, match=r"guided_chunk\(1, 4, 5\) returned 5, expected 1: never more than remains"):
        checks.check_guided_chunk(lambda remaining, workers, least: max(least, math.ceil(remaining / workers)), n=3)
    with pytest.raises(checks.CheckFailed, match=r"now=10.0\) returned \[\], expected \[10\]: lease 10\'s deadline"):
        checks.check_expired_leases(lambda leases, now: [k for k, (_, _, d) in leases.items() if d is not None and d < now], n=3)
    with pytest.raises(checks.CheckFailed, match=r"now=5.0\) returned \[12\], expected \[\]"):
        checks.check_expired_leases(lambda leases, now: [k for k, (_, _, d) in leases.items() if (d or 0) <= now], n=3)
    with pytest.raises(checks.CheckFailed, match=r"call 3, record_result\(done, 3, 'second'\) returned True, expected False"):
        checks.check_record_result(lambda done, task, result: done.__setitem__(task, result) or True, n=3)
    with pytest.raises(checks.CheckFailed, match=r"factoring_chunks\(100, 4, 1\) returned \[13, 11, 10, "):
        checks.check_factoring_chunks(factoring_without_batches, n=3)


def factoring_without_batches(n_tasks, workers, min_chunk):
    """Wrong: a new chunk size after every chunk, not after every batch of `workers` chunks."""
    import math
    sizes, left = [], n_tasks
    while left:
        sizes.append(min(left, max(min_chunk, math.ceil(left / (2 * workers)))))
        left -= sizes[-1]
    return sizes


# ---------------------------------------------------------------- chapter 05b (kernel-side checks, engines of their own)

def test_ready_tasks_check_names_each_classic_mistake():
    def ignores_running(queue, depends_on, finished, running):
        return [t for t in queue if t not in finished and all(d in finished for d in depends_on[t])]

    def any_dependency(queue, depends_on, finished, running):
        return [t for t in queue if t not in running and t not in finished
                and (not depends_on[t] or any(d in finished for d in depends_on[t]))]

    def sorted_by_name(queue, depends_on, finished, running):
        return sorted(t for t in queue if t not in running and t not in finished
                      and all(d in finished for d in depends_on[t]))
    with pytest.raises(checks.CheckFailed, match=r"running=\['clean'\]\) returned \['clean', 'plot'\], expected "
                                                 r"\['plot'\]: 'clean' is running already"):
        checks.check_ready_tasks(ignores_running)
    with pytest.raises(checks.CheckFailed, match=r"returned \['train b', 'evaluate', 'plot'\], expected "
                                                 r"\['train b', 'plot'\]: 'evaluate' still waits for 'train b', which "
                                                 r"has not finished: 'train a' has finished, but every task it depends "
                                                 r"on must have \(all, not any\)$"):
        checks.check_ready_tasks(any_dependency)
    with pytest.raises(checks.CheckFailed, match=r"the right tasks, but keep the queue's order"):
        checks.check_ready_tasks(sorted_by_name)


def test_ready_tasks_check_runs_the_scheduler_and_names_a_task_that_started_too_early():
    from syncml_lib.checks.engines import _graph_run

    def ignores_dependencies(queue, depends_on, finished, running):
        return [t for t in queue if t not in running and t not in finished]
    (problem,) = _graph_run(ignores_dependencies)
    assert re.fullmatch(r"in a real run, task 't\d+' started at \d+ ms, before its dependency 't\d+' ended at \d+ ms",
                        problem), problem


def requeue_removing_while_looping(lost, attempts, retries):
    """The mistake: again.remove(t) inside `for t in again` skips the task after each one removed."""
    again, given_up = list(lost), []
    for t in again:
        if attempts[t] > retries:
            again.remove(t)
            given_up.append(t)
    return again, given_up


def test_requeue_lost_check_names_a_lost_task_and_runs_the_scheduler():
    with pytest.raises(checks.CheckFailed, match=r"returned \(\[\], \[\]\): task 'a' is in neither list, so it is lost"):
        checks.check_requeue_lost(lambda lost, attempts, retries: ([], []))
    with pytest.raises(checks.CheckFailed, match=r"requeue_lost\(lost=\['a'\], attempts=\{'a': 3\}, retries=2\) returned "
                                                 r"\(\['a'\], \[\]\), expected \(\[\], \['a'\]\): 'a' has had "
                                                 r"attempts\['a'\] = 3 > retries = 2: it has been on 3 engines that died, "
                                                 r"so it is given up$"):
        checks.check_requeue_lost(lambda lost, attempts, retries: ([t for t in lost if attempts[t] < retries + 2], []))
    from syncml_lib.checks.engines import _dying_run
    (problem,) = _dying_run(lambda lost, attempts, retries: ([t for t in lost if attempts[t] <= retries], []))
    assert "requeue_lost dropped ['item 9']: neither run again nor given up" in problem, problem


@pytest.mark.parametrize("answer, message", [
    (requeue_removing_while_looping,
     r"requeue_lost\(lost=\['a', 'b'\], attempts=\{'a': 2, 'b': 2\}, retries=1\) returned \(\['b'\], \['a'\]\), expected "
     r"\(\[\], \['a', 'b'\]\): 'b' has had attempts\['b'\] = 2 > retries = 1: it has been on 2 engines that died, so "
     r"it is given up; it comes right after 'a', which you gave up: removing 'a' from a list while a for loop walks "
     r"over that list makes the loop skip the next task, 'b'; build new lists instead"),
    (lambda lost, attempts, retries: ([t for t in lost if attempts[t] > retries], [t for t in lost if attempts[t] <= retries]),
     r"requeue_lost\(lost=\['a'\], attempts=\{'a': 1\}, retries=2\) returned \(\[\], \['a'\]\), expected \(\['a'\], "
     r"\[\]\): the two lists are swapped \(in all 7 cases\); return \(again, given_up\), the tasks that go back to the "
     r"queue first$"),
    (lambda lost, attempts, retries: ([t for t in lost if attempts[t] < retries], [t for t in lost if attempts[t] >= retries]),
     r"requeue_lost\(lost=\['a'\], attempts=\{'a': 2\}, retries=2\) returned \(\[\], \['a'\]\), expected \(\['a'\], "
     r"\[\]\): 'a' has had attempts\['a'\] = 2 <= retries = 2, so it goes back to the queue$"),
    (lambda lost, attempts, retries: (sorted(t for t in lost if attempts[t] <= retries)[::-1],
                                      [t for t in lost if attempts[t] > retries]),
     r"returned \(\['c', 'a'\], \['b'\]\), expected \(\['a', 'c'\], \['b'\]\): the right tasks in each list, but keep "
     r"the order of lost$"),
], ids=["remove while looping", "swapped", "off by one", "order"])
def test_requeue_lost_check_names_each_classic_mistake(answer, message):
    with pytest.raises(checks.CheckFailed, match=message):
        checks.check_requeue_lost(answer)


def test_a_kernel_side_check_gives_up_on_an_endless_loop():
    def loops(queue, depends_on, finished, running):
        while True:
            pass
    with pytest.raises(checks.CheckFailed, match=r"check_ready_tasks: gave up after 2 s; your function never returned"):
        checks.check_ready_tasks(loops, timeout=2)


# ---------------------------------------------------------------- issue 8: checks that check what they say

def called_by_the_library():
    """True inside a real run (the caller of the learner's function is a library module), False when
    the check's own table calls it: answers that are right in the table and wrong where it counts."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    return caller.startswith("syncml_lib") and not caller.startswith("syncml_lib.checks")


def scatter_with_a_header(comm, data, n, d):
    """Right: the library's own scatter_rows, which bcasts a ragged (shape, dtype) header first."""
    from syncml_lib import data as library
    return library.scatter_rows(comm, data)


def scatter_with_keyword_bcast(comm, data, n, d):
    """Right: the counts travel in a small bcast passed by keyword."""
    from mpi4py import MPI
    from syncml_lib.data import block_range
    counts = comm.bcast(obj=[len(block_range(n, comm.size, r)) * d for r in range(comm.size)]
                        if comm.rank == 0 else None, root=0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    mine = np.empty((counts[comm.rank] // d, d))
    comm.Scatterv([data, counts, starts, MPI.DOUBLE] if comm.rank == 0 else None, mine, root=0)
    return mine


def scatter_by_keyword_Bcast(comm, data, n, d):
    """Wrong: all the data in a buffer-based Bcast, passed by keyword."""
    from syncml_lib.data import block_range
    full = data if comm.rank == 0 else np.empty((n, d))
    comm.Bcast(buf=full, root=0)
    block = block_range(n, comm.size, comm.rank)
    return full[block.start:block.stop].copy()


def test_scatter_check_measures_broadcasts_from_the_buffer_or_the_pickle():
    checks.check_scatter_rows(scatter_with_a_header, n=4)
    checks.check_scatter_rows(scatter_with_keyword_bcast, n=4)
    with pytest.raises(checks.CheckFailed, match=r"ranks 2, 3: trial 0 \(10 rows of 3 on 4 ranks\): this rank received "
                                                 r"240 bytes through Bcast: all 10 rows \(240 bytes\), to keep 2"):
        checks.check_scatter_rows(scatter_by_keyword_Bcast, n=4)


def test_checks_insist_on_the_type_they_expect():
    with pytest.raises(checks.CheckFailed, match=r"guided_chunk\(100, 4, 1\) returned 25.0, a float64; a chunk is a "
                                                 r"number of tasks: return an int"):
        checks.check_guided_chunk(lambda remaining, workers, least: min(remaining, max(least, np.ceil(remaining / workers))),
                                  n=3)
    with pytest.raises(checks.CheckFailed, match=r"guided_chunk\(100, 4, 1\) returned True, a bool"):
        checks.check_guided_chunk(lambda remaining, workers, least: True, n=2)
    with pytest.raises(checks.CheckFailed, match=r"call 1, record_result\(done, 3, 'first'\) returned 1, an int; "
                                                 r"return True or False"):
        checks.check_record_result(lambda done, task, result: int(done.setdefault(task, result) is result), n=2)
    with pytest.raises(checks.CheckFailed, match=r"may_read\(step=0, clock=0, staleness=0\) returned 1, an int; "
                                                 r"return True or False"):
        checks.check_ssp_rule(lambda step, clock, staleness: int(clock >= step - staleness), n=2)
    with pytest.raises(checks.CheckFailed, match=r"epoch 0, n=10: returned indices of dtype float64: indices must be "
                                                 r"integers"):
        checks.check_epoch_indices(lambda n, size, rank, epoch, seed: np.resize(
            np.random.default_rng([seed, epoch]).permutation(n), -(-n // size) * size)[rank::size].astype(float), n=2)
    with pytest.raises(checks.CheckFailed, match=r"now=5.0\) returned a generator: return a list"):
        checks.check_expired_leases(lambda leases, now: (k for k, (_, _, d) in leases.items()
                                                         if d is not None and d <= now), n=2)
    with pytest.raises(checks.CheckFailed, match=r"shard\(np.arange\(10\), 1\) returned slice 0 as a list: return numpy "
                                                 r"arrays \(slices of flat\)"):
        checks.check_shard(lambda flat, n_servers: [list(flat)], n=2)


def may_read_like_bsp_in_a_run(step, clock, staleness):
    """Right in the table; in a real run BSP's rule: never lets a worker run ahead."""
    return clock >= step - (0 if called_by_the_library() else staleness)


def may_read_one_too_loose_in_a_run(step, clock, staleness):
    """Right in the table; in a real run one step looser than the bound."""
    return clock >= step - staleness - (1 if called_by_the_library() else 0)


def test_ssp_check_makes_a_worker_slow_and_sees_the_others_run_ahead():
    with pytest.raises(checks.CheckFailed, match=r"worker 0 was slow \(\d+ ms a step\), yet no other worker ever read "
                                                 r"parameters 1 step stale"):
        checks.check_ssp_rule(may_read_like_bsp_in_a_run, n=3)
    with pytest.raises(checks.CheckFailed, match=r"computed on parameters with clock \d+, 2 steps stale \(staleness=1\)"):
        checks.check_ssp_rule(may_read_one_too_loose_in_a_run, n=4)


def record_result_keeping_every_result_in_a_run(done, task, result):
    """Right in the table; in a real run every result counts, also a task's second one."""
    if called_by_the_library():
        done[task] = result
        return True
    if task in done:
        return False
    done[task] = result
    return True


def test_short_lease_check_really_runs_tasks_twice():
    with pytest.raises(checks.CheckFailed, match=r"task \d+ was counted twice, from worker \d \(rank \d\) and worker \d "
                                                 r"\(rank \d\).*workers are numbered 0 \.\. W-1, worker w is rank w \+ 1"):
        checks.check_record_result(record_result_keeping_every_result_in_a_run, n=3)


def record_result_with_get(done, task, result):
    if done.get(task):
        return False
    done[task] = result
    return True


def test_record_result_check_names_a_falsy_first_result():
    with pytest.raises(checks.CheckFailed, match=r"call 4, record_result\(done, 4, 16\) returned True, expected False: "
                                                 r"task 4 has a result already, 0: a falsy result \(0, None, ''\) is a result "
                                                 r"too; ask `task in done`, not `done.get\(task\)`"):
        checks.check_record_result(record_result_with_get, n=2)


def test_expired_leases_check_names_the_actual_mistake():
    with pytest.raises(checks.CheckFailed, match=r"now=10.0\) returned \[30, 31\], task ids: return the lease ids \(the keys "
                                                 r"of `leases`\), expected \[10\]"):
        checks.check_expired_leases(lambda leases, now: [t for _, (_, tasks, d) in leases.items()
                                                         if d is not None and d <= now for t in tasks], n=2)
    with pytest.raises(checks.CheckFailed, match=r"now=10.0\) returned \[\], expected \[10\]: lease 10's deadline is "
                                                 r"10.0, equal to now, and a deadline equal to now has passed: "
                                                 r"compare deadline <= now, not <"):
        checks.check_expired_leases(lambda leases, now: [k for k, (_, _, d) in leases.items()
                                                         if d is not None and d < now], n=2)
    with pytest.raises(checks.CheckFailed, match=r"now=5.0\) returned \[12\], expected \[\]: lease 12 has no deadline "
                                                 r"\(None\): it never expires; skip it"):
        checks.check_expired_leases(lambda leases, now: [k for k, (_, _, d) in leases.items() if (d or 0) <= now], n=2)
    with pytest.raises(checks.CheckFailed, match=r"raised TypeError: .*NoneType.* lease 12 has no deadline \(None\): it "
                                                 r"never expires; skip it"):
        checks.check_expired_leases(lambda leases, now: [k for k, (_, _, d) in leases.items() if d <= now], n=2)
    with pytest.raises(checks.CheckFailed, match=r"now=5.0\) returned \[10, 11, 13\], expected \[\]: lease 10's deadline, "
                                                 r"10.0, is still ahead of now = 5.0; a lease has expired when deadline <= now"):
        checks.check_expired_leases(lambda leases, now: [k for k, (_, _, d) in leases.items()
                                                         if d is not None and d > now], n=2)


def shard_with_array_split(flat, n_servers):
    return list(np.array_split(flat, n_servers))


def test_shard_check_refuses_np_array_split():
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1: shard\(np.arange\(10\), 1\) called np.array_split: the "
                                                 r"exercise asks you to cut the slices yourself, with slicing"):
        checks.check_shard(shard_with_array_split, n=2)


# ---------------------------------------------------------------- chapter 06

def summed_over_ranks(comm, arrays, weight=1):
    """weight * each array, summed over the ranks with the buffer-based Allreduce: a new dict."""
    total = {}
    for name, value in arrays.items():
        total[name] = np.empty_like(value)
        comm.Allreduce(weight * value, total[name])
    return total


def right_weighted_average(comm, grads, n_local):
    n_total = comm.allreduce(n_local)
    return {name: total / n_total for name, total in summed_over_ranks(comm, grads, n_local).items()}


def unweighted_mean_of_means(comm, grads, n_local):
    return {name: total / comm.size for name, total in summed_over_ranks(comm, grads).items()}


def sum_of_means(comm, grads, n_local):
    return summed_over_ranks(comm, grads)


def weighted_sum_over_p(comm, grads, n_local):
    return {name: total / comm.size for name, total in summed_over_ranks(comm, grads, n_local).items()}


def weights_grads_in_place(comm, grads, n_local):
    for grad in grads.values():
        grad *= n_local
    n_total = comm.allreduce(n_local)
    return {name: total / n_total for name, total in summed_over_ranks(comm, grads).items()}


def average_as_a_list(comm, grads, n_local):
    return list(right_weighted_average(comm, grads, n_local).values())


def average_by_pickle(comm, grads, n_local):
    n_total = comm.allreduce(n_local)
    return {name: comm.allreduce(n_local * grad) / n_total for name, grad in grads.items()}


_calls_in_a_run = [0]  # per process: each check runs in an mpiexec of its own


def weighted_sum_of_means_from_step_5(comm, grads, n_local):
    """Right alone (the check's trials name their parameters W and b); in a run, from its 6th call on, the
    sum of the ranks' means."""
    if "W1" in grads:
        _calls_in_a_run[0] += 1
        if _calls_in_a_run[0] > 5:
            return sum_of_means(comm, grads, n_local)
    return right_weighted_average(comm, grads, n_local)


def test_weighted_average_check_names_each_classic_mistake():
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: trial 0 \(examples by rank \[1, 6, 4\]\): W\[\d, \d\] is .*, "
                                                 r"expected .*: that is the mean of the ranks' means, which weights each "
                                                 r"rank equally: ranks with fewer examples count too much \(rank 0 has 1 of "
                                                 r"the 11 examples, yet counts for 1/3\)"):
        checks.check_weighted_average(unweighted_mean_of_means, n=3)
    with pytest.raises(checks.CheckFailed, match=r"that is the sum of the ranks' means, not divided: about p = 3 times the "
                                                 r"mean gradient, so the learning rate is multiplied by p"):
        checks.check_weighted_average(sum_of_means, n=3)
    with pytest.raises(checks.CheckFailed, match=r"that is sum_r n_r g_r divided by the number of ranks p = 3; divide by "
                                                 r"the total count of examples N = sum_r n_r = 11"):
        checks.check_weighted_average(weighted_sum_over_p, n=3)
    with pytest.raises(checks.CheckFailed, match=r"ranks 1, 2: trial 0 .*: your function changed grads\['W'\] in place"):
        checks.check_weighted_average(weights_grads_in_place, n=3)  # rank 0 has 1 example: times 1 changes nothing
    with pytest.raises(checks.CheckFailed, match=r"returned a list: return a dict name -> array, with the names of grads"):
        checks.check_weighted_average(average_as_a_list, n=2)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1: trial 0 .*: your function sent arrays through the "
                                                 r"pickle-based comm.allreduce.*use the buffer-based comm.Allreduce"):
        checks.check_weighted_average(average_by_pickle, n=2)


def test_weighted_average_check_names_the_step_parameter_and_rank_in_a_real_run():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_weighted_average(weighted_sum_of_means_from_step_5, n=3)
    message = str(info.value)
    # 61 examples on 3 ranks: 21, 20, 20
    assert "ranks 0, 1, 2: trial" not in message
    for ranks, examples in (("rank 0", 21), ("ranks 1, 2", 20)):
        assert re.search(rf"{ranks}: a real train\(comm, 'allreduce', model='mlp', epochs=1, batch_size=61, lr=0.2\), "
                         rf"step 5: your function returned (W|b)\d(\[[\d, ]+\])? = \S+, expected \S+ \(the mean gradient "
                         rf"over the global batch's 61 examples; this rank had {examples} of them\)", message), message


def right_average(comm, params):
    return {name: total / comm.size for name, total in summed_over_ranks(comm, params).items()}


def average_with_the_left_neighbour(comm, params):
    average = {}
    for name, value in params.items():
        left = np.empty_like(value)
        comm.Sendrecv(value, dest=(comm.rank + 1) % comm.size, recvbuf=left, source=(comm.rank - 1) % comm.size)
        average[name] = (value + left) / 2
    return average


def average_in_place(comm, params):
    from mpi4py import MPI
    for value in params.values():
        comm.Allreduce(MPI.IN_PLACE, value)
        value /= comm.size
    return params


def average_skipped_by_rank_one(comm, params):
    if comm.rank == 1:
        return {name: value.copy() for name, value in params.items()}
    return right_average(comm, params)


def average_keeping_its_own_from_the_second_run(comm, params):
    """Right alone and in the H=1 run (23 averages); in the H=4 run, each rank keeps its own parameters."""
    if "W1" in params:
        _calls_in_a_run[0] += 1
        if _calls_in_a_run[0] > 23:
            right_average(comm, params)  # the same collectives as the right answer, its result thrown away
            return {name: value.copy() for name, value in params.items()}
    return right_average(comm, params)


def average_parameters_by_pickle(comm, params):
    return {name: comm.allreduce(value) / comm.size for name, value in params.items()}


def average_over_p_minus_one(comm, params):
    return {name: total / (comm.size - 1) for name, total in summed_over_ranks(comm, params).items()}


def test_average_parameters_check_names_each_classic_mistake():
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: trial 0: W\[\d, \d\] is .*, expected .*: that is the sum "
                                                 r"over the ranks, not divided by their number p = 3"):
        checks.check_average_parameters(summed_over_ranks, n=3)
    with pytest.raises(checks.CheckFailed, match=r"rank 0: trial 0: .*: that is the mean of this rank's and rank 2's "
                                                 r"parameters only: every rank must get the mean over all 3 ranks"):
        checks.check_average_parameters(average_with_the_left_neighbour, n=3)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: trial 0: your function changed params\['W'\] in place: "
                                                 r"leave the caller's arrays as they are and return new ones"):
        checks.check_average_parameters(average_in_place, n=3)
    with pytest.raises(checks.CheckFailed, match=r"rank 1: trial 0: W\[\d, \d\] is .*: that is this rank's own parameters: "
                                                 r"no averaging happened"):
        checks.check_average_parameters(lambda comm, params: params, n=2)
    with pytest.raises(checks.CheckFailed, match=r"rank 0: trial 0: your function returned params' own arrays"):
        checks.check_average_parameters(lambda comm, params: params, n=1)  # the right values on 1 rank
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: did not finish within 2s"):
        checks.check_average_parameters(average_skipped_by_rank_one, n=3, timeout=2)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: trial 0: W\[\d, \d\] is .*, expected .*: that is the sum "
                                                 r"over the ranks divided by p - 1 = 2: divide by p = 3, the number of "
                                                 r"ranks whose parameters the sum holds \(this rank's own included\)"):
        checks.check_average_parameters(average_over_p_minus_one, n=3)
    with pytest.raises(checks.CheckFailed, match=r"that is the sum over the ranks, not divided by their number p = 2 "
                                                 r"\(or divided by p - 1 = 1\)"):
        checks.check_average_parameters(average_over_p_minus_one, n=2)


def test_both_averaging_checks_refuse_arrays_sent_through_the_pickle_based_allreduce():
    """One rule for exercises 1 and 2 of chapter 06: right values, but arrays through comm.allreduce."""
    for check, answer in ((checks.check_weighted_average, average_by_pickle),
                          (checks.check_average_parameters, average_parameters_by_pickle)):
        with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1: trial 0( \(examples by rank \[\d, \d\]\))?: your "
                                                     r"function sent arrays through the pickle-based comm.allreduce, "
                                                     r"which pickles and copies every array: use the buffer-based "
                                                     r"comm.Allreduce\(send, recv\) for arrays"):
            check(answer, n=2)


def test_average_parameters_check_runs_local_sgd_with_h_4_too():
    with pytest.raises(checks.CheckFailed, match=r"rank 0: a real train\(comm, 'local_sgd', model='mlp', H=4, epochs=1, "
                                                 r"batch_size=61, lr=0.2\), step 3: your function returned .* \(the mean "
                                                 r"over the 3 ranks of the parameters they passed\)"):
        checks.check_average_parameters(average_keeping_its_own_from_the_second_run, n=3)


def within(filled, size, cap):
    return cap is None or filled + size <= cap


def buckets(layer_sizes, bucket_bytes, order=None, fits=within):
    """Right (with the defaults): the positions in `order` (default: as given), a bucket taking the next
    layer while fits(its bytes so far, the layer's, bucket_bytes)."""
    result, filled = [], 0
    for position in order if order is not None else range(len(layer_sizes)):
        if result and fits(filled, layer_sizes[position], bucket_bytes):
            result[-1].append(position)
            filled += layer_sizes[position]
        else:
            result.append([position])
            filled = layer_sizes[position]
    return result


def buckets_in_forward_order(layer_sizes, bucket_bytes):
    return buckets(layer_sizes, bucket_bytes, order=reversed(range(len(layer_sizes))))


def buckets_closed_once_over(layer_sizes, bucket_bytes):
    """Closes a bucket only after it went over the cap: a bucket of several layers then passes it."""
    return buckets(layer_sizes, bucket_bytes, fits=lambda filled, size, cap: cap is None or filled < cap)


def buckets_comparing_none(layer_sizes, bucket_bytes):
    return buckets(layer_sizes, bucket_bytes, fits=lambda filled, size, cap: filled + size <= cap)


def buckets_per_rank(layer_sizes, bucket_bytes):
    from mpi4py import MPI
    return [[i] for i in range(len(layer_sizes))] if MPI.COMM_WORLD.rank == 2 else buckets(layer_sizes, bucket_bytes)


_bucket_calls = [0]


def buckets_reversed_in_a_run(layer_sizes, bucket_bytes):
    """Right in the check's table (each of its 8 cases is asked twice); in the run, each bucket reversed."""
    _bucket_calls[0] += 1
    result = buckets(layer_sizes, bucket_bytes)
    return [bucket[::-1] for bucket in result] if _bucket_calls[0] > 16 else result


def test_assign_buckets_check_names_each_classic_mistake():
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1: assign_buckets\(\[10, 20, 30\], None\) returned \[\[2, 1, 0\]\], "
                                                 r"expected \[\[0, 1, 2\]\]: the buckets take the layers in forward order"):
        checks.check_assign_buckets(buckets_in_forward_order, n=2)
    with pytest.raises(checks.CheckFailed, match=r"assign_buckets\(\[10, 20, 30\], 29\) returned \[\[0, 1\], \[2\]\], expected "
                                                 r"\[\[0\], \[1\], \[2\]\]: bucket \[0, 1\] holds 10 \+ 20 = 30 bytes, over "
                                                 r"bucket_bytes=29: a bucket may pass the cap only when it holds a single layer"):
        checks.check_assign_buckets(buckets_closed_once_over, n=2)
    with pytest.raises(checks.CheckFailed, match=r"returned \[\[0, 1\]\], expected \[\[0, 1, 2\]\]: layer 2 is in no bucket"):
        checks.check_assign_buckets(lambda sizes, cap: buckets(sizes[:2], cap), n=2)
    with pytest.raises(checks.CheckFailed, match=r"returned \[\[0, 1, 2\], \[2\]\], expected \[\[0, 1, 2\]\]: layer 2 is in 2 "
                                                 r"buckets: every layer goes in exactly one"):
        checks.check_assign_buckets(lambda sizes, cap: buckets(sizes, cap) + [[len(sizes) - 1]], n=2)
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: assign_buckets\(\[10, 20, 30\], None\): on rank 0 returned "
                                                 r"\[\[0, 1, 2\]\], on rank 2 returned \[\[0\], \[1\], \[2\]\]: every rank must "
                                                 r"make the same buckets"):
        checks.check_assign_buckets(buckets_per_rank, n=3)
    with pytest.raises(checks.CheckFailed, match=r"raised TypeError: .*NoneType.*: bucket_bytes=None means one bucket "
                                                 r"for everything; test for None before comparing"):
        checks.check_assign_buckets(buckets_comparing_none, n=2)


def test_assign_buckets_check_insists_on_lists_of_ints():
    with pytest.raises(checks.CheckFailed, match=r"returned \[\(0, 1, 2\)\]: return a list of buckets, each a list of "
                                                 r"positions"):
        checks.check_assign_buckets(lambda sizes, cap: [tuple(b) for b in buckets(sizes, cap)], n=2)
    with pytest.raises(checks.CheckFailed, match=r"returned \[\[0.0, 1.0, 2.0\]\]: 0.0, a float is not a position"):
        checks.check_assign_buckets(lambda sizes, cap: [[float(i) for i in b] for b in buckets(sizes, cap)], n=2)


def test_assign_buckets_check_runs_the_buckets_for_real():
    with pytest.raises(checks.CheckFailed, match=r"ranks 0, 1, 2: a real train\(comm, 'bucketed', model='mlp 64-48-32-24-10', "
                                                 r"bucket_bytes=10000, overlap=True, .*; in the run, assign_buckets\(\[2000, "
                                                 r"6336, 12544, 24960\], 10000\) returned \[\[1, 0\], \[2\], \[3\]\]"):
        checks.check_assign_buckets(buckets_reversed_in_a_run, n=3)


def test_chapter_06_checks_run_what_their_tables_say():
    from syncml_lib.checks import training
    from syncml_lib.training import MLP
    # the run's MLP: its layers' gradient bytes, last layer first, are the table's last case
    model = MLP(training.BUCKET_MODEL)
    params = model.init(0)
    sizes = [8 * sum(params[name].size for name in model.layers[layer]) for layer in reversed(range(4))]
    assert list(training.BUCKET_CASES[-1][0]) == [sizes, training.BUCKET_CAP]
    # the runs' global batch divides by no rank count from 2 to 5: unequal shards
    assert all(training.RUN["batch_size"] % p for p in range(2, 6))


def test_a_run_that_went_wrong_names_the_first_wrong_update_from_the_losses():
    from types import SimpleNamespace
    from syncml_lib.checks.training import _final_problem
    losses = [2.3, 2.2, 2.1, 2.0]
    reference = SimpleNamespace(params={"b": np.zeros(3)}, history=[dict(step=s, loss=l) for s, l in enumerate(losses)])
    result = SimpleNamespace(params={"b": np.array([0.0, 0.5, 0.0])},
                             history=[dict(step=s, loss=l + (s >= 2)) for s, l in enumerate(losses)])
    assert _final_problem("the run", reference, reference, 1e-12, "the reference") is None
    assert _final_problem("the run", result, reference, 1e-12, "the reference") == (
        "the run with your function ended with b[1] = 0.5 on this rank, expected 0 (the reference), 0.5 apart "
        "(allowed: 1e-12); the loss first differs at step 2 (3.1, expected 2.1), so the update of step 1 went wrong")


def test_the_ranks_that_import_this_module_do_not_import_nbformat():
    """See the module's docstring: every rank of every check run above imports this module."""
    import subprocess

    code = "import sys, test_exercises; print(sorted(m for m in ('nbformat', 'jsonschema') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# ---------------------------------------------------------------- chapter 07

def topk_without_residual(update, residual, k):
    """The mistake: top-k of the update alone, the residual ignored (no error feedback)."""
    indices = np.argsort(-np.abs(update))[:k]
    new_residual = update + residual
    new_residual[indices] -= update[indices]
    return indices, update[indices], new_residual


def topk_residual_dropped(update, residual, k):
    """The mistake: the unsent entries are thrown away (the residual stays 0)."""
    corrected = update + residual
    indices = np.argsort(-np.abs(corrected))[:k]
    return indices, corrected[indices], np.zeros_like(update)


def topk_smallest(update, residual, k):
    corrected = update + residual
    indices = np.argsort(np.abs(corrected))[:k]
    new_residual = corrected.copy()
    new_residual[indices] = 0
    return indices, corrected[indices], new_residual


def topk_sends_the_update(update, residual, k):
    """The mistake: the right indices, but the update's values sent instead of update + residual's."""
    corrected = update + residual
    indices = np.argsort(-np.abs(corrected))[:k]
    new_residual = corrected.copy()
    new_residual[indices] = 0
    return indices, update[indices], new_residual


def topk_in_place(update, residual, k):
    """The mistake: the residual updated in place (the answer itself is right)."""
    residual += update
    indices = np.argsort(-np.abs(residual))[:k]
    values = residual[indices].copy()
    new_residual = residual.copy()
    new_residual[indices] = 0
    return indices, values, new_residual


@pytest.mark.parametrize("answer, message", [
    (topk_without_residual, "(that is the update alone: add the residual first, corrected = update + residual)"),
    (topk_sends_the_update, "(that is update[index]: send corrected[indices], the values of update + residual)"),
    (topk_in_place, "case 0 (k=4 of 40 values) changed its argument residual in place"),
    (topk_residual_dropped, "loses part of the update: at index"),
    (topk_smallest, "not the 4 largest |update + residual|"),
])
def test_topk_check_names_each_classic_mistake(answer, message):
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_topk_error_feedback(answer, n=2)
    assert "rank" in str(info.value) and message in str(info.value), str(info.value)


def masks_both_add(rank, size, seed, shape):
    """The mistake: both ranks of a pair add the mask, so nothing cancels."""
    from syncml_lib.secure_aggregation import pair_mask

    total = np.zeros(shape, dtype=np.uint32)
    for other in range(size):
        if other != rank:
            total += pair_mask(seed, min(rank, other), max(rank, other), shape)
    return total


def masks_own_seed_order(rank, size, seed, shape):
    """The mistake: each rank seeds the pair (rank, other), so the two ranks of a pair use different masks."""
    from syncml_lib.secure_aggregation import pair_mask

    total = np.zeros(shape, dtype=np.uint32)
    for other in range(size):
        if other > rank:
            total += pair_mask(seed, rank, other, shape)
        elif other < rank:
            total -= pair_mask(seed, rank, other, shape)
    return total


def masks_int64(rank, size, seed, shape):
    from syncml_lib.secure_aggregation import pairwise_masks

    return pairwise_masks(rank, size, seed, shape).astype(np.int64)


@pytest.mark.parametrize("answer, message", [
    (masks_both_add, "the masks of all ranks must sum to 0 modulo 2^32, element 0 sums to"),
    (masks_own_seed_order, "the masks of all ranks must sum to 0 modulo 2^32"),
    (masks_int64, "expected a uint32 array of shape (1000,)"),
    (lambda rank, size, seed, shape: np.zeros(shape, dtype=np.uint32), "element 0 of the mask is 0"),
])
def test_pairwise_masks_check_names_each_classic_mistake(answer, message):
    """Each of these mistakes is the same on every rank: the report shows it once, for ranks 0, 1, 2."""
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_pairwise_masks(answer, n=3)
    assert str(info.value).count(message) == 1 and "\n  ranks 0, 1, 2: pairwise_masks(rank, size=3, seed=7, " \
        "shape=(1000,))" in str(info.value), str(info.value)


def split_by_raw_id(comm, nodes):
    """The mistake: the node id itself as the colour (MPICH accepts negative colours, but not MPI.UNDEFINED)."""
    from mpi4py import MPI

    node_comm = comm.Split(color=nodes[comm.rank], key=comm.rank)
    leaders = comm.Split(color=0 if node_comm != MPI.COMM_NULL and node_comm.rank == 0 else MPI.UNDEFINED,
                         key=comm.rank)
    return node_comm, (leaders if leaders != MPI.COMM_NULL else None)


def split_null_for_non_leaders(comm, nodes):
    """The mistake: MPI.COMM_NULL instead of None on the ranks that do not lead."""
    from mpi4py import MPI

    colour = sorted(set(nodes)).index(nodes[comm.rank])
    node_comm = comm.Split(color=colour, key=comm.rank)
    return node_comm, comm.Split(color=0 if node_comm.rank == 0 else MPI.UNDEFINED, key=comm.rank)


def split_leaders_everywhere(comm, nodes):
    """The mistake: every rank in the leaders' communicator."""
    colour = sorted(set(nodes)).index(nodes[comm.rank])
    return comm.Split(color=colour, key=comm.rank), comm.Split(color=0, key=comm.rank)


def split_reversed(comm, nodes):
    from mpi4py import MPI

    colour = sorted(set(nodes)).index(nodes[comm.rank])
    node_comm = comm.Split(color=colour, key=-comm.rank)
    leaders = comm.Split(color=0 if node_comm.rank == 0 else MPI.UNDEFINED, key=comm.rank)
    return node_comm, (leaders if node_comm.rank == 0 else None)


def split_with_the_id_as_colour(comm, nodes):
    """The mistake the exercise warns about, as a learner writes it: on the ranks of node id MPI.UNDEFINED the
    first Split gives MPI.COMM_NULL, whose .rank raises, while the other ranks wait in the second Split."""
    from mpi4py import MPI

    node_comm = comm.Split(color=nodes[comm.rank], key=comm.rank)
    leader = node_comm.rank == 0
    leaders_comm = comm.Split(color=0 if leader else MPI.UNDEFINED, key=comm.rank)
    return node_comm, (leaders_comm if leader else None)


def test_split_nodes_check_reports_an_error_that_left_the_other_ranks_waiting_at_once():
    """The ranks whose node id is MPI.UNDEFINED raise in the learner's function; the others are waiting in its
    next Split for them. The check names both, well within its time limit, instead of a hang."""
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_split_nodes(split_with_the_id_as_colour, n=4, timeout=20)
    message = str(info.value)
    assert "did not finish" not in message and "error stack" not in message, message
    assert re.search(r"\n  ranks 0, 1: split_nodes\(comm, \[-32766, -32766, 0, 0\]\): your function raised Exception: "
                     r"Invalid communicator: Null communicator \(line \d+ of split_with_the_id_as_colour.*\) \(this "
                     r"rank's node id -32766 is MPI.UNDEFINED: passed as the colour, it gives MPI.COMM_NULL; use the "
                     r"node's position among the sorted ids as the colour\)\n", message), message
    assert re.search(r"\n  ranks 2, 3: split_nodes\(comm, \[-32766, -32766, 0, 0\]\): your function raised "
                     r"OtherRanksLeft: comm.Split here would wait forever: ranks 0, 1 had already left your function "
                     r"\(raised or returned there\); every rank must make the same collective calls", message), message


def split_only_on_leaders(comm, nodes):
    """The mistake: only the leaders call the second Split; the others return before it."""
    colour = sorted(set(nodes)).index(nodes[comm.rank])
    node_comm = comm.Split(color=colour, key=comm.rank)
    if node_comm.rank != 0:
        return node_comm, None
    return node_comm, comm.Split(color=0, key=comm.rank)


@pytest.mark.parametrize("answer, message", [
    (split_only_on_leaders, "ranks 0, 2: split_nodes(comm, [0, 0, 1, 1]): your function raised OtherRanksLeft: "
                            "comm.Split here would wait forever: ranks 1, 3 had already left your function"),
    (split_leaders_everywhere, "so leaders_comm must be None"),
    (split_reversed, "in comm's order (comm.Split with one colour per node, key=comm.rank)"),
    (split_by_raw_id, "(this rank's node id -32766 is MPI.UNDEFINED: passed as the colour, it gives MPI.COMM_NULL; "
                      "use the node's position among the sorted ids as the colour)"),
    (split_null_for_non_leaders, "so leaders_comm must be None; got MPI.COMM_NULL (split with colour MPI.UNDEFINED"),
])
def test_split_nodes_check_names_each_classic_mistake(answer, message):
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_split_nodes(answer, n=4)
    assert message in str(info.value), str(info.value)
