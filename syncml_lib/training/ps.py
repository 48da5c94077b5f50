"""Training through the parameter server of chapter 02 (run_parameter_server).

Ranks 0 .. S-1 hold the parameters; the other W ranks are workers. At step t, worker w pulls the
parameters, computes g_w, the mean gradient over its block of n_w examples of global batch t (the
batch is split over the W workers, not over all ranks), and pushes (W n_w / N) g_w. A BSP server
applies params -= lr * (1/W) sum_w (W n_w / N) g_w = params - lr sum_w n_w g_w / N: data-parallel
SGD's update exactly. SSP and ASP apply each push as it comes (lr / W times it): each worker's
share of the batch, applied to parameters that may miss up to `staleness` steps of the others.
BSP with b backup workers applies the mean of the first W-b pushes of a step: with equal shares,
the mean gradient over those workers' (W-b)/W of the batch; a worker left behind skips ahead, and
its history has an empty row (no examples, no time) for each step it skipped.

Cost per step: each worker sends n bytes of gradient and receives n bytes of parameters; each
server sends and receives 2 W n / S (parameter_server.py). Test accuracy after each epoch is
measured by worker 0 on the parameters it pulls for the first step it computes in the next epoch
(in BSP, exactly the parameters after the epoch; with backups worker 0 may have skipped the
epoch's first steps, and if it computes none of the later epochs' steps, on the final parameters).
"""
import time

import numpy as np

from ..parameter_server import run_parameter_server
from .loop import gradients_checked
from .digits import shard_of

__all__ = ["train_ps"]


def train_ps(comm, job, mode="bsp", staleness=0, n_servers=1, backups=0):
    """Train with run_parameter_server on every rank of comm (collective); returns the final parameters.
    backups: BSP's backup workers (run_parameter_server). A bad gradient or a diverging run ends the
    run on every rank (RunAborted naming the worker)."""
    model, record = job.model, job.record
    n_workers = comm.size - n_servers
    mine = {}  # step -> (local loss, examples, compute seconds) of this worker
    evaluations = {}  # step -> seconds worker 0 spent measuring the test accuracy before it
    evaluated = 0  # worker 0: the epochs evaluated so far (the epoch boundaries it has crossed)

    def grad_fn(params, worker, step):
        nonlocal evaluated
        epoch, batch = job.batch(step)
        if worker == 0 and evaluated < epoch:  # the first step it computes in a new epoch
            evaluating = time.perf_counter()
            accuracy = None  # several epochs skipped at once: one measurement for all their ends
            for done in range(evaluated, epoch):  # the parameters after epoch `done`
                record.evaluate(done, step, params, accuracy)  # its time is set in _record_steps
                accuracy = record.evaluations[-1]["test_accuracy"]
            evaluated = epoch
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
                                  staleness=staleness, n_servers=n_servers, backups=backups)
    if comm.rank == n_servers and evaluated < job.epochs - 1:  # worker 0 skipped every step after them
        accuracy = None
        for done in range(evaluated, job.epochs - 1):
            record.evaluate(done, job.total_steps, result.params, accuracy)
            accuracy = record.evaluations[-1]["test_accuracy"]
    ends = _record_steps(comm, job, result, n_servers, mine, evaluations)
    record.evaluate(job.epochs - 1, job.total_steps, result.params, when=ends[-1])
    return result.params


def _record_steps(comm, job, result, n_servers, mine, evaluations):
    """This rank's history rows from run_parameter_server's history (times since its start, which all
    ranks share), and worker 0's evaluations on every rank. Returns the time each step ended.
    Every rank gets exactly one row per step (Record.finish lines them up by step): a worker that
    skipped a step (backups) gets an empty one, ending when the step did."""
    record, is_server = job.record, comm.rank < n_servers
    rows = {(row["worker"], row["step"]): row for row in result.history}
    ends = list(result.step_times)  # when each step was complete on every server
    gradient_bytes = sum(value.nbytes for value in job.params.values())
    for t in range(job.total_steps):
        epoch = t // job.steps_per_epoch
        if is_server:  # serving all the time: the step lasts from the previous step's end to its own
            sent = result.server_bytes[comm.rank]["sent"] / job.total_steps
            record.step(t, epoch, 0.0, 0, compute=0.0, communication=ends[t] - (ends[t - 1] if t else 0.0),
                        bytes_sent=sent, end=ends[t])
        elif (comm.rank - n_servers, t) not in rows:  # skipped: completed without this worker
            record.step(t, epoch, 0.0, 0, compute=0.0, communication=0.0, bytes_sent=0, end=ends[t])
        else:
            row = rows[comm.rank - n_servers, t]
            loss, examples, compute = mine[t]
            record.step(t, epoch, loss, examples, compute=compute,
                        communication=row["end"] - row["start"] - compute - evaluations.get(t, 0.0),
                        bytes_sent=gradient_bytes, end=row["end"])
    # worker 0's evaluations, timed by its clock: put them on the run's clock (its pull of that step,
    # or the end of the run for those it made on the final parameters)
    worker0 = comm.bcast(record.evaluations, root=n_servers)
    pulled = {row["step"]: row["pulled"] for row in result.history if row["worker"] == 0}
    pulled[job.total_steps] = ends[-1]
    record.evaluations = [dict(e, time=pulled[e["step"]]) for e in worker0]
    return ends
