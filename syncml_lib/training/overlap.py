"""When does overlapping the gradient's reduction with the backward pass hide it? A simulated backward pass.

Bucketing (bucketing.py) starts a bucket's nonblocking Iallreduce as soon as its layers' gradients
are done, so that the reduction can run while the backward pass computes the earlier layers. Whether
it really runs meanwhile depends on who moves the bytes:

- MPICH moves a nonblocking collective on only inside MPI calls of the same process (unless its
  progress thread is switched on, below). Between two MPI calls, nothing moves.
- On one machine, MPI's messages are copies through shared memory, made by the ranks' own cores. A
  core busy computing the backward pass is not copying: the copies wait for the next MPI call, and
  then take the core's time anyway.

So overlap can only hide communication when something other than the computing core does the work:
here the backward pass "happens elsewhere", a sleep per layer standing for an accelerator (the core
is free meanwhile, and the device's work goes on whatever the core does), and the core moves the
reductions on by polling them (MPI_Testall every `slice_seconds` during the sleep), or MPICH's
progress thread does. That is DDP's situation: the
GPU computes, and NCCL's kernels move the bytes on their own stream. device="cpu" does the same
work on the rank's own core instead (a fixed amount of numpy work per slice), to show the other side.

    result = simulated_backward(comm, grads, layer_slices, mode="poll")   # grads in backward order
    result["reduced"]     # per layer, the sum over the ranks (= comm.Allreduce of each layer)
    result["compute"], result["communication"], result["step"]    # seconds on this rank

Modes, each with the same buckets and the same Iallreduce calls:
    "none"   the whole backward pass, then every bucket's Iallreduce, then Waitall;
    "wait"   each bucket's Iallreduce started as soon as its last layer is done, nothing else until
             the Waitall after the backward pass (progress only inside the next Iallreduce and the Wait);
    "poll"   the same starts, and MPI_Testall on the started requests after every slice of work.
With MPIR_CVAR_ASYNC_PROGRESS=1 in the environment before MPI starts (and mpi4py's default thread
level, "multiple"), MPICH's own thread moves the requests on in "wait" mode too (progress_thread_env).

Cost, with compute C (the backward pass) and communication R (the buckets reduced alone, "none"
mode's wait): "none" takes C + R; a perfect overlap max(C, R), and with buckets no less than C plus
the reduction of the buckets that end after the backward pass (bucketing.exposed_communication).
"""
import contextlib
import os
import time

import numpy as np
from mpi4py import MPI

from .bucketing import assign_buckets, exposed_communication

__all__ = ["MODES", "DEVICES", "simulated_backward", "measure_overlap", "progress_thread_env", "progress_thread_on",
           "best_overlap"]

MODES = ("none", "wait", "poll")
DEVICES = ("sleep", "cpu")
ASYNC_PROGRESS = "MPIR_CVAR_ASYNC_PROGRESS"


def _cpu_slice(work=np.linspace(0.0, 1.0, 1 << 15), out=np.empty(1 << 15)):
    """A fixed piece of work on this core: numpy without BLAS, so one thread, the same in every mode."""
    for _ in range(8):
        np.sqrt(work, out=out)
        np.multiply(out, 1.000001, out=out)


def simulated_backward(comm, grads, layer_slices, mode, bucket_bytes=0, device="sleep", slice_seconds=1e-3):
    """One backward pass with the gradient reduced in buckets by MPI's Iallreduce; collective on comm.

    grads: this rank's gradient of each layer, float64 arrays in backward order (the last layer
    first). layer_slices[i]: the backward work of layer i, in slices. device="sleep": the work is
    done elsewhere, by a device that needs slice_seconds per slice whatever this core does (layer i
    is done slice_seconds * (slices of layers 0..i) after the start), while this core sleeps, in
    naps of at most slice_seconds. device="cpu": a slice is a fixed piece of numpy work on this core.
    The layers go into buckets by assign_buckets(bytes, bucket_bytes) (0: one per
    layer). mode: "none", "wait" or "poll" (module docstring). Cost: the slices, plus one
    Iallreduce per bucket (2 (p-1)/p of its bytes sent and received per rank by a ring), plus in
    "poll" one MPI_Testall per slice.

    Returns a dict: reduced (per layer, the sum over the ranks, in grads' shapes), compute (seconds
    from the start to the end of the last layer's work, the polls included), communication (seconds
    from then until every bucket is reduced: what was not hidden), step (their sum).
    """
    if mode not in MODES:
        raise ValueError(f"simulated_backward: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if device not in DEVICES:
        raise ValueError(f"simulated_backward: device must be one of {', '.join(DEVICES)}, got {device!r}")
    if len(layer_slices) != len(grads):
        raise ValueError(f"simulated_backward: {len(grads)} gradients but {len(layer_slices)} layer_slices")
    grads = [np.ascontiguousarray(g, dtype=np.float64) for g in grads]
    buckets = assign_buckets([g.nbytes for g in grads], bucket_bytes)
    last_of = {positions[-1]: b for b, positions in enumerate(buckets)}
    sends = [np.empty(sum(grads[i].size for i in positions)) for positions in buckets]
    received = [np.empty_like(send) for send in sends]
    requests = []
    began = time.perf_counter()
    for layer, device_done in enumerate(np.cumsum(layer_slices) * slice_seconds):
        if device == "sleep":  # the device works on its own: the layer is done at a fixed time
            while (left := began + device_done - time.perf_counter()) > 0:
                time.sleep(min(slice_seconds, left))
                if mode == "poll" and requests:
                    MPI.Request.Testall(requests)  # moves the started reductions on
        else:
            for _ in range(layer_slices[layer]):
                _cpu_slice()
                if mode == "poll" and requests:
                    MPI.Request.Testall(requests)
        b = last_of.get(layer)
        if b is not None:  # the bucket's last layer is done: fill its buffer
            np.concatenate([grads[i].ravel() for i in buckets[b]], out=sends[b])
            if mode != "none":
                requests.append(comm.Iallreduce(sends[b], received[b], op=MPI.SUM))
    backward_end = time.perf_counter()
    if mode == "none":
        requests = [comm.Iallreduce(send, out, op=MPI.SUM) for send, out in zip(sends, received)]
    MPI.Request.Waitall(requests)
    end = time.perf_counter()

    reduced = []
    for b, positions in enumerate(buckets):
        start = 0
        for i in positions:
            reduced.append(received[b][start:start + grads[i].size].reshape(grads[i].shape))
            start += grads[i].size
    return dict(reduced=reduced, compute=backward_end - began, communication=end - backward_end,
                step=end - began)


def measure_overlap(comm, layer_bytes, layer_slices, modes=MODES, device="sleep", bucket_bytes=0,
                    slice_seconds=1e-3, repeat=5):
    """Time simulated_backward in each mode on every rank of comm (collective), the modes taking turns
    (a slow spell of the machine hits all of them), each step after a Barrier, after one warm-up
    step each. layer_bytes: each layer's gradient in bytes, in backward order.

    Returns {mode: dict(compute, communication, step)}: medians over the `repeat` steps of the slowest
    rank's seconds, the same on every rank; and under "buckets", the bucket layout and, under
    "progress_thread", whether MPICH's progress thread runs (progress_thread_on)."""
    rng = np.random.default_rng(comm.rank)
    grads = [rng.standard_normal(nbytes // 8) for nbytes in layer_bytes]
    times = {mode: [] for mode in modes}
    for i in range(repeat + 1):
        for mode in modes:
            comm.Barrier()
            result = simulated_backward(comm, grads, layer_slices, mode, bucket_bytes, device, slice_seconds)
            if i:  # the first round warms up
                times[mode].append([result[key] for key in ("compute", "communication", "step")])
    summary = {}
    for mode in modes:
        mine = np.array(times[mode])
        slowest = np.empty_like(mine)
        comm.Allreduce(mine, slowest, op=MPI.MAX)
        summary[mode] = dict(zip(("compute", "communication", "step"), np.median(slowest, axis=0).tolist()))
    summary["buckets"] = assign_buckets(list(layer_bytes), bucket_bytes)
    summary["progress_thread"] = comm.allreduce(progress_thread_on(), op=MPI.LAND)
    return summary


def best_overlap(compute, communication, layer_bytes, layer_slices, bucket_bytes=0):
    """The shortest step bucketed overlap can give: compute, plus what of the reduction is left after
    the backward pass if bucket i starts when its last layer is done (the layers' compute in
    proportion to their slices) and the buckets, one at a time, share `communication` in proportion
    to their bytes (bucketing.exposed_communication). Never less than max(compute, communication)."""
    buckets = assign_buckets(list(layer_bytes), bucket_bytes)
    done = np.cumsum(layer_slices) / np.sum(layer_slices) * compute
    ready = [done[positions[-1]] for positions in buckets]
    total = float(np.sum(layer_bytes))
    seconds = [communication * sum(layer_bytes[i] for i in positions) / total for positions in buckets]
    return compute + exposed_communication(seconds, ready, compute)


def progress_thread_on():
    """True if MPICH's progress thread runs in this process: MPIR_CVAR_ASYNC_PROGRESS=1 was in the
    environment when MPI started, at thread level MPI_THREAD_MULTIPLE (mpi4py's default)."""
    return os.environ.get(ASYNC_PROGRESS) == "1" and MPI.Query_thread() == MPI.THREAD_MULTIPLE


@contextlib.contextmanager
def progress_thread_env():
    """Inside the block, MPI jobs this process starts (syncml_lib.mpirun) get MPIR_CVAR_ASYNC_PROGRESS=1;
    the variable is put back as it was after. MPICH reads it in MPI_Init: it cannot be switched on in
    a running MPI process (an engine)."""
    before = os.environ.get(ASYNC_PROGRESS)
    os.environ[ASYNC_PROGRESS] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ASYNC_PROGRESS]
        else:
            os.environ[ASYNC_PROGRESS] = before
