"""Bucketing and overlap: reduce the gradient in buckets of layers, each started as soon as backward produced it.

The backward pass gives the last layer's gradient first. Instead of one allreduce of the whole
gradient after the backward pass, the layers are grouped, in backward order, into buckets of at most
bucket_bytes (assign_buckets); as soon as a bucket's last layer is done, a nonblocking MPI
Iallreduce of the bucket starts, and the backward pass goes on to the earlier layers meanwhile.
Before the update, every bucket is waited for. Each bucket holds n_r g_r of its layers, so the sum
divided by the batch's N is the weighted average of data-parallel SGD (same result, up to rounding).

    time per step ~ forward + backward + the reduction of the buckets that could not be hidden:
    with k buckets of n_i bytes, sum_i t_allreduce(n_i), at best minus the backward time after bucket i
    started (overlap); more buckets cost more alpha (2 (p-1) alpha each for the ring), fewer hide less.

Every rank must start the buckets in the same order. MPI matches collective calls on a communicator
by their order alone, not by buffer or size: if rank 0 starts bucket A then B and rank 1 starts B then
A, rank 0's A is reduced with rank 1's B. With equal sizes that silently adds one layer's gradient to
another's (corrupt parameters, no error); with different sizes MPI fails with a truncation error, or
ranks wait forever for a partner that is in another call (deadlock). Here the order is fixed by the
layers' backward order and assign_buckets, which are the same on every rank, and a bad gradient on one
rank still fills its bucket (with NaN, see loop.py), so no rank skips a bucket.

MPICH makes progress on a nonblocking collective only inside MPI calls of the same process (no
progress thread), so after each layer the outstanding requests are tested (MPI_Testall), which moves
them on, between layers only: a layer's backward is one numpy call, and the copies through shared
memory are this rank's core's work, whenever they are done. So here overlap gives the same model but
hides little or no communication; overlap.py measures when starting early does hide it (the backward
pass done elsewhere, the reductions polled or moved by MPICH's progress thread).
The bytes these collectives send are MPI's business: they are not counted (bytes_sent None).
"""
import time

import numpy as np
from mpi4py import MPI

from .loop import backward_checked, forward_checked, stop_together
from .digits import shard_of

__all__ = ["assign_buckets", "Buckets", "exposed_communication", "train_bucketed"]


def assign_buckets(layer_sizes, bucket_bytes):
    """Group layers into buckets: a list of lists of positions in layer_sizes (bytes of each layer's
    gradient, in backward order), consecutive and in order. A bucket takes layers while their total
    stays within bucket_bytes; a layer bigger than bucket_bytes gets a bucket of its own.
    bucket_bytes=0: one bucket per layer; bucket_bytes=None: one bucket for everything."""
    buckets, filled = [], 0
    for position, size in enumerate(layer_sizes):
        if buckets and (bucket_bytes is None or filled + size <= bucket_bytes):
            buckets[-1].append(position)
            filled += size
        else:
            buckets.append([position])
            filled = size
    return buckets


def exposed_communication(bucket_seconds, ready, backward_end):
    """Seconds of reduction still to wait for when the backward pass ends, if bucket i may start at
    ready[i] (its last layer done) and takes bucket_seconds[i], one bucket at a time (they share the
    network): finish_i = max(ready_i, finish_(i-1)) + bucket_seconds[i]; returns
    max(0, finish_last - backward_end). Without overlap every bucket starts after the backward pass:
    sum(bucket_seconds)."""
    finish = 0.0
    for seconds, start in zip(bucket_seconds, ready):
        finish = max(start, finish) + seconds
    return max(0.0, finish - backward_end)


class Buckets:
    """Where each parameter's gradient sits: bucket b is one flat send buffer and one receive buffer;
    slots[name] = (bucket, slice). Built once; the same on every rank."""

    def __init__(self, model, params, bucket_bytes):
        self.backward_layers = list(reversed(range(len(model.layers))))
        sizes = [sum(params[name].nbytes for name in model.layers[layer]) for layer in self.backward_layers]
        self.layers_of = assign_buckets(sizes, bucket_bytes)  # positions in backward order
        self.bucket_of_layer, self.last_layer_of, self.slots = {}, [], {}
        lengths = []
        for b, positions in enumerate(self.layers_of):
            start = 0
            for position in positions:
                layer = self.backward_layers[position]
                self.bucket_of_layer[layer] = b
                for name in model.layers[layer]:
                    self.slots[name] = (b, slice(start, start + params[name].size))
                    start += params[name].size
            self.last_layer_of.append(self.backward_layers[positions[-1]])
            lengths.append(start)
        self.send = [np.empty(n) for n in lengths]
        self.received = [np.empty(n) for n in lengths]
        self.nbytes = [8 * n for n in lengths]


def train_bucketed(comm, job, bucket_bytes=32 << 10, overlap=True):
    """Data-parallel SGD with the gradient reduced in buckets by MPI's (I)allreduce, on every rank of
    comm (collective). overlap=True starts each bucket's Iallreduce as soon as its layers are done;
    overlap=False reduces the buckets one after the other (blocking Allreduce) after the whole
    backward pass. Returns the final parameters."""
    model, params, record = job.model, {name: value.copy() for name, value in job.params.items()}, job.record
    buckets = Buckets(model, params, bucket_bytes)
    record.start(comm)
    for step, epoch, batch, epoch_done in job.steps():
        began = time.perf_counter()
        rows = shard_of(batch, comm.size, comm.rank)
        n_local, n_total = len(rows), len(batch)
        activations, loss, problem = forward_checked(model, params, job.X[rows], job.y[rows], job.interrupted())
        requests, communication = [], 0.0
        for layer, grads, problem in backward_checked(model, params, activations, job.y[rows], problem):
            for name, grad in grads.items():
                b, where = buckets.slots[name]
                np.multiply(grad.ravel(), n_local, out=buckets.send[b][where])
            mark = time.perf_counter()
            b = buckets.bucket_of_layer[layer]
            if overlap and layer == buckets.last_layer_of[b]:
                requests.append(comm.Iallreduce(buckets.send[b], buckets.received[b], op=MPI.SUM))
            if requests:
                MPI.Request.Testall(requests)  # lets MPI move the started reductions on
            communication += time.perf_counter() - mark

        mark = time.perf_counter()
        if overlap:
            MPI.Request.Waitall(requests)
        else:
            for send, received in zip(buckets.send, buckets.received):
                comm.Allreduce(send, received, op=MPI.SUM)
        communication += time.perf_counter() - mark
        stop_together(comm, buckets.received, problem, step)
        for name in params:
            b, where = buckets.slots[name]
            params[name] -= job.lr * (buckets.received[b][where] / n_total).reshape(params[name].shape)
        record.step(step, epoch, loss, n_local, compute=time.perf_counter() - began - communication,
                    communication=communication, bytes_sent=None)
        if epoch_done:
            record.evaluate(epoch, step + 1, params)
    return params
