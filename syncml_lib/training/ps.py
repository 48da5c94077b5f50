"""Training through the parameter server of chapter 02 (run_parameter_server).

Ranks 0 .. S-1 hold the parameters; the other W ranks are workers. At step t, worker w pulls the
parameters, computes g_w, the mean gradient over its block of n_w examples of global batch t (the
batch is split over the W workers, not over all ranks), and pushes (W n_w / N) g_w. A BSP server
applies params -= lr * (1/W) sum_w (W n_w / N) g_w = params - lr sum_w n_w g_w / N: data-parallel
SGD's update exactly. SSP and ASP apply each push as it comes (lr / W times it): each worker's
share of the batch, applied to parameters that may miss up to `staleness` steps of the others.

Cost per step: each worker sends n bytes of gradient and receives n bytes of parameters; each
server sends and receives 2 W n / S (parameter_server.py). Test accuracy after each epoch is
measured by worker 0 on the parameters it pulls for the next epoch's first step (in BSP, exactly
the parameters after the epoch).
"""
import time

import numpy as np

from ..parameter_server import run_parameter_server
from .loop import gradients_checked
from .digits import shard_of

__all__ = ["train_ps"]


def train_ps(comm, job, mode="bsp", staleness=0, n_servers=1):
    """Train with run_parameter_server on every rank of comm (collective); returns the final parameters.
    A bad gradient or a diverging run ends the run on every rank (RunAborted naming the worker)."""
    model, record = job.model, job.record
    n_workers = comm.size - n_servers
    mine = {}  # step -> (local loss, examples, compute seconds) of this worker
    evaluations = {}  # step -> seconds worker 0 spent measuring the test accuracy before it

    def grad_fn(params, worker, step):
        epoch, batch = job.batch(step)
        if worker == 0 and step and step % job.steps_per_epoch == 0:  # the parameters after epoch - 1
            evaluating = time.perf_counter()
            record.evaluate(epoch - 1, step, params)  # its time is set in _record_steps
            evaluations[step] = time.perf_counter() - evaluating
        began = time.perf_counter()
        rows = shard_of(batch, n_workers, worker)
        loss, grads, problem = gradients_checked(model, params, job.X[rows], job.y[rows])
        if problem:
            raise ValueError(problem)
        if not all(np.isfinite(g).all() for g in grads.values()):
            raise FloatingPointError(f"the gradient is not finite at step {step}: the run diverged (try a smaller lr)")
        share = n_workers * len(rows) / len(batch)
        mine[step] = (loss, len(rows), time.perf_counter() - began)
        return {name: share * grad for name, grad in grads.items()}

    record.start(comm)
    result = run_parameter_server(comm, job.params, grad_fn, steps=job.total_steps, lr=job.lr, mode=mode,
                                  staleness=staleness, n_servers=n_servers)
    ends = _record_steps(comm, job, result, n_servers, mine, evaluations)
    record.evaluate(job.epochs - 1, job.total_steps, result.params, when=ends[-1])
    return result.params


def _record_steps(comm, job, result, n_servers, mine, evaluations):
    """This rank's history rows from run_parameter_server's history (times since its start, which all
    ranks share), and worker 0's evaluations on every rank. Returns the time each step ended."""
    record, is_server = job.record, comm.rank < n_servers
    rows = {(row["worker"], row["step"]): row for row in result.history}
    ends = [0.0] * job.total_steps  # when the step's last worker finished it
    for (_, step), row in rows.items():
        ends[step] = max(ends[step], row["end"])
    gradient_bytes = sum(value.nbytes for value in job.params.values())
    for t in range(job.total_steps):
        epoch = t // job.steps_per_epoch
        if is_server:  # serving all the time: the step lasts from the previous step's end to its own
            sent = result.server_bytes[comm.rank]["sent"] / job.total_steps
            record.step(t, epoch, 0.0, 0, compute=0.0, communication=ends[t] - (ends[t - 1] if t else 0.0),
                        bytes_sent=sent, end=ends[t])
        else:
            row = rows[comm.rank - n_servers, t]
            loss, examples, compute = mine[t]
            record.step(t, epoch, loss, examples, compute=compute,
                        communication=row["end"] - row["start"] - compute - evaluations.get(t, 0.0),
                        bytes_sent=gradient_bytes, end=row["end"])
    # worker 0's evaluations, timed by its clock: put them on the run's clock (its pull of that step)
    worker0 = comm.bcast(record.evaluations, root=n_servers)
    pulled = {row["step"]: row["pulled"] for row in result.history if row["worker"] == 0}
    record.evaluations = [dict(e, time=pulled[e["step"]]) for e in worker0]
    return ends
