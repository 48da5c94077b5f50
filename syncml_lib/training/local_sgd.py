"""Local SGD: every rank takes H steps on its own shards alone, then the ranks average their parameters.

    for every step:  params_r -= lr * g_r               (rank r's mean gradient on its shard; no message)
    every H steps:   params = sum_r n_r params_r / N     (n_r: examples rank r saw since the last average)

With H = 1 this is data-parallel SGD exactly: sum_r n_r (params - lr g_r) / N = params - lr g. With
larger H the replicas drift apart between averages (each follows its own shards' gradients), and the
ranks communicate H times less: one allreduce of the parameters (n bytes) per H steps. The weights
n_r / N (FedAvg's) matter when the shards are unequal; average_parameters itself is the plain mean,
so each rank hands it its parameters times its share p n_r / N (1 when the shards are equal).
"""
import time

from ..allreduce import allreduce
from ..trace import TracedComm
from .loop import flatten, gradients_checked, stop_together, unflatten
from .digits import shard_of

__all__ = ["average_parameters", "train_local_sgd"]


def average_parameters(comm, params, algorithm="ring"):
    """The mean over all ranks of each parameter, on every rank: one allreduce of all of them
    flattened into one vector, divided by the number of ranks. Collective; returns a new dict."""
    total = allreduce(comm, flatten(params), algorithm=algorithm, check=False)
    return unflatten(total / comm.size, params)


def train_local_sgd(comm, job, H=4, algorithm="ring"):
    """Local SGD on every rank of comm (collective), averaging every H steps and after the last one.
    Returns the final parameters, equal on every rank. The accuracy recorded after an epoch is the
    mean of the replicas' accuracies (they differ between averages)."""
    model, params, record = job.model, {name: value.copy() for name, value in job.params.items()}, job.record
    traced = TracedComm(comm)
    seen = seen_by_all = 0  # examples since the last average: mine, everyone's
    problem = None  # the first bad gradient since the last average, if any: it made my replica NaN
    record.start(comm)
    for step, epoch, batch, epoch_done in job.steps():
        began = time.perf_counter()
        rows = shard_of(batch, comm.size, comm.rank)
        loss, grads, step_problem = gradients_checked(model, params, job.X[rows], job.y[rows], job.interrupted())
        problem = problem or step_problem
        for name in params:
            params[name] -= job.lr * grads[name]
        seen, seen_by_all = seen + len(rows), seen_by_all + len(batch)
        computed = time.perf_counter()

        communication, bytes_sent = 0.0, 0
        averaged = (step + 1) % H == 0 or step == job.total_steps - 1
        if averaged:
            share = comm.size * seen / seen_by_all
            params = average_parameters(traced, {name: share * value for name, value in params.items()},
                                        algorithm=algorithm)
            communication = time.perf_counter() - computed
            stop_together(comm, params.values(), problem, step)
            bytes_sent = traced.bytes_sent()
            traced.records.clear()
            seen = seen_by_all = 0
            problem = None
        record.step(step, epoch, loss, len(rows), compute=computed - began, communication=communication,
                    bytes_sent=bytes_sent)
        if epoch_done:  # between averages, the replicas differ: their mean accuracy
            mine = model.accuracy(params, record.X_test, record.y_test)
            record.evaluate(epoch, step + 1, params, accuracy=mine if averaged else comm.allreduce(mine) / comm.size)
    return params
