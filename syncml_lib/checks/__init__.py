"""Exercise checks: run the learner's function for real on every rank and say what is wrong.

    check_global_mean(global_mean, view)     # on the notebook's MPI engines
    check_global_mean(global_mean)           # or under `mpiexec -n 4`, e.g. from a test

Every check runs the learner's function on every rank with seeded inputs, on a fresh duplicate of
the communicator, and raises CheckFailed naming the first rank, trial and value that are wrong, or
prints what passed; it gives up after TIMEOUT seconds (a hang) and says which ranks wait where.

    harness.py           the machinery every check shares (run_on_ranks, CheckFailed, exercise_check)
    tour.py              chapter 00: a global mean
    synchronize.py       chapter 01: the Lamport clock rule, the compare-and-set update, the wait at a barrier
    parameter_server.py  chapter 02: SSP's admission rule, the momentum update, shards
    allreduce.py         chapter 03: the ring's reduce-scatter and allgather, recursive doubling
    data.py              chapter 04: a real scatter, the sampler's indices, the owners of a key
    scheduling.py        chapter 05: guided and factoring chunks, expired leases, the first result of a task
    engines.py           chapter 05b (in the kernel, on plain engines): ready tasks, a dead engine's tasks
    training.py          chapter 06: the weighted gradient average, local SGD's averaging, the buckets
    performance.py       chapter 07: top-k with error feedback, the pairwise masks, the nodes' communicators
"""
from .harness import TIMEOUT, CheckFailed, run_on_ranks
from .tour import check_global_mean, global_mean_inputs
from .synchronize import check_cas_update, check_expected_wait, check_lamport_tick
from .parameter_server import check_momentum, check_shard, check_ssp_rule
from .allreduce import check_recursive_doubling, check_ring_allgather, check_ring_reduce_scatter
from .data import check_epoch_indices, check_ring_owners, check_scatter_rows
from .scheduling import check_expired_leases, check_factoring_chunks, check_guided_chunk, check_record_result
from .engines import check_ready_tasks, check_requeue_lost
from .training import check_assign_buckets, check_average_parameters, check_weighted_average
from .performance import check_pairwise_masks, check_split_nodes, check_topk_error_feedback

__all__ = ["CheckFailed", "run_on_ranks", "TIMEOUT", "check_global_mean", "check_lamport_tick", "check_cas_update",
           "check_expected_wait", "check_ring_reduce_scatter",
           "check_ring_allgather", "check_recursive_doubling", "check_ssp_rule", "check_momentum", "check_shard",
           "check_scatter_rows", "check_epoch_indices", "check_ring_owners", "check_guided_chunk", "check_factoring_chunks",
           "check_ready_tasks", "check_requeue_lost",
           "check_expired_leases", "check_record_result", "check_weighted_average", "check_average_parameters",
           "check_assign_buckets", "check_topk_error_feedback", "check_pairwise_masks", "check_split_nodes"]
