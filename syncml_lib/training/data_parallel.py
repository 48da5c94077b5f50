"""Data-parallel SGD with allreduce, and the single-process reference it must equal.

Every step, with a global batch of N examples split over p ranks (rank r has n_r of them):

    1. each rank computes g_r, the mean gradient of the loss over its n_r examples;
    2. the ranks average: g = sum_r n_r g_r / sum_r n_r   (weighted_average: one allreduce);
    3. every rank applies the same update, params -= lr g, so the replicas stay equal.

g is then exactly the mean gradient over the whole batch, what one process computes on all N
examples: so the run equals the single-process one (up to rounding) for any p, also when p does not
divide N. Averaging the ranks' means without the weights, (1/p) sum_r g_r, gives the examples of the
smaller shards more weight; summing without dividing multiplies the learning rate by p.

Cost per step: the forward and backward pass on N/p examples, and one allreduce of the gradient
(n bytes) plus one number: for the ring, 2(p-1) alpha + 2 (p-1)/p n beta (allreduce.py).
"""
import time

import numpy as np

from ..allreduce import allreduce
from ..trace import TracedComm
from .loop import flatten, gradients_checked, stop_together, unflatten
from .digits import shard_of

__all__ = ["weighted_average", "compressed_average", "train_data_parallel"]


def weighted_average(comm, grads, n_local, algorithm="ring"):
    """The mean gradient over all ranks' examples: sum_r n_r g_r / sum_r n_r, on every rank.

    grads: name -> this rank's mean gradient over its n_local examples. One allreduce (any of
    allreduce.ALGORITHMS) of every n_local * g_r and n_local itself, flattened into one vector;
    then each sum is divided by the total count. Collective; returns a new dict."""
    mine = np.append(n_local * flatten(grads), float(n_local))
    total = allreduce(comm, mine, algorithm=algorithm, check=False)
    return unflatten(total[:-1] / total[-1], grads)


def compressed_average(comm, grads, n_local, n_total, compressor):
    """weighted_average through a compressor (compression.py): about sum_r n_r g_r / N, on every rank.
    Each rank hands the compressor n_r g_r; N, the global batch, is known to every rank."""
    total = compressor.sum(comm, {name: n_local * grad for name, grad in grads.items()})
    return {name: value / n_total for name, value in total.items()}


def train_data_parallel(comm, job, algorithm="ring", compression=None):
    """Data-parallel SGD on every rank of comm (collective); comm None: the single-process reference,
    the whole global batch in this process and nothing to average. Returns the final parameters.
    compression: a compressor of compression.py (reset here) that replaces the exact average."""
    model, params, record = job.model, {name: value.copy() for name, value in job.params.items()}, job.record
    traced = None if comm is None else TracedComm(comm)  # counts the bytes our allreduce sends
    if compression is not None:
        compression.reset(params)
    record.start(comm)
    for step, epoch, batch, epoch_done in job.steps():
        began = time.perf_counter()
        rows = batch if comm is None else shard_of(batch, comm.size, comm.rank)
        loss, grads, problem = gradients_checked(model, params, job.X[rows], job.y[rows], job.interrupted())
        computed = time.perf_counter()
        if comm is None:
            average = grads
        elif compression is not None:
            average = compressed_average(traced, grads, len(rows), len(batch), compression)
            problem = problem or compression.problem
        else:
            average = weighted_average(traced, grads, len(rows), algorithm=algorithm)
        communicated = time.perf_counter()
        stop_together(comm, average.values(), problem, step)  # a NaN on any rank stops every rank here
        for name in params:
            params[name] -= job.lr * average[name]
        bytes_sent = 0 if traced is None else traced.bytes_sent()
        if traced is not None:
            traced.records.clear()  # so bytes_sent() is this step's next time
        record.step(step, epoch, loss, len(rows), compute=(computed - began) + (time.perf_counter() - communicated),
                    communication=communicated - computed, bytes_sent=bytes_sent)
        if epoch_done:
            record.evaluate(epoch, step + 1, params)
    return params
