"""`bench train`: one model trained with every mechanism, and bucketing with and without overlap (chapter 06).

    make bench BENCH=train                                           # 4 ranks (RANKS=4), ~25 s
    make bench BENCH=train BENCH_ARGS="--epochs 2 --bucket-steps 5 --hidden 32 32"

Table 1, one row per mechanism: training.train on the MLP of the chapter (64-128-10), the same epochs,
batch size and lr for all; time per epoch (the slowest rank's), time until the test accuracy first
reached --target after an epoch, the final accuracy, bytes sent per step per rank (mean over the
ranks, and the busiest rank), and the communication share of the step on the ranks that compute.
The sequential run is on rank 0 alone while the others sleep.

Table 2, one row per bucket layout of a deeper MLP (--hidden, backward order), from one bucket per
layer to one bucket for everything: the buckets' MPI Allreduces one after another with no training
(measured), against one MPI Allreduce of the whole gradient, and the cost model's prediction of the
same ratio (costmodel.predict with DEFAULT_PARAMS, the algorithm costmodel.choose picks for each
bucket as a stand-in for MPI's choice); then in training, the communication per step that is left
to wait for without overlap and with it, each as a ratio to that one Allreduce, and with overlap the
cost model's prediction (bucketing.exposed_communication: buckets start when their last layer's
backward is done, measured layer by layer, and are reduced one at a time). Medians over the steps of
the slowest rank.
"""
import time

import numpy as np
from mpi4py import MPI

from .. import costmodel
from ..rpc import wait_sleeping
from ..training import MLP, load_digits_split, time_to_accuracy, train
from ..training.bucketing import Buckets, exposed_communication
from ..training.loop import one_blas_thread
from ..training.digits import shard_of
from .common import format_time, print_table, progress, require_ranks, time_calls

MECHANISM_RUNS = [  # (label, mechanism, options)
    ("sequential (1 process)", "sequential", {}),
    ("allreduce, ring", "allreduce", dict(algorithm="ring")),
    ("allreduce, recursive doubling", "allreduce", dict(algorithm="recursive_doubling")),
    ("ps BSP, 1 server", "ps", dict(mode="bsp")),
    ("ps SSP s=2, 1 server", "ps", dict(mode="ssp", staleness=2)),
    ("ps ASP, 1 server", "ps", dict(mode="asp")),
    ("local SGD, H=4", "local_sgd", dict(H=4)),
    ("local SGD, H=16", "local_sgd", dict(H=16)),
    ("bucketed 32 KB, overlap", "bucketed", dict(bucket_bytes=32 << 10, overlap=True)),
]


def size(nbytes):
    """Bytes for a table: 812 B, 112.6 KB, 1.7 MB."""
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


# ----------------------------------------------------------------------------- table 1: every mechanism

def run_mechanism(comm, mechanism, options, args):
    """One training run; returns its summary (a dict) on every rank."""
    kwargs = dict(model="mlp", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    if mechanism == "sequential":  # rank 0 alone: the others would take its cores
        result = train(None, mechanism, **kwargs) if comm.rank == 0 else None
        wait_sleeping(comm.Ibarrier(), interval=1e-3)
        everyone = [summarize(result)] if comm.rank == 0 else []
        return comm.bcast(everyone, root=0)
    result = train(comm, mechanism, **kwargs, **options)
    return comm.allgather(summarize(result))


def summarize(result):
    rows = result.history
    computing = [row for row in rows if row["examples"]]
    sent = [row["bytes_sent"] for row in rows]
    return dict(seconds=result.seconds, epochs=len(result.evaluations), accuracy=result.test_accuracy,
                evaluations=result.evaluations,
                bytes=None if None in sent else float(np.mean(sent)),
                compute=sum(row["compute"] for row in computing), comm=sum(row["communication"] for row in computing))


def mechanism_row(label, everyone, target):
    epochs = everyone[0]["epochs"]
    first = everyone[0]
    to_target = [time_to_accuracy(r["evaluations"], target) for r in everyone]
    reached = None if None in to_target else max(to_target)
    epoch_reached = next((e["epoch"] + 1 for e in first["evaluations"] if e["test_accuracy"] >= target), None)
    spent = sum(r["compute"] + r["comm"] for r in everyone)
    share = sum(r["comm"] for r in everyone) / spent if spent else 0.0
    if first["bytes"] is None:
        sent = "MPI's own (unseen)"
    else:
        mean, busiest = np.mean([r["bytes"] for r in everyone]), max(r["bytes"] for r in everyone)
        sent = size(mean) + (f" (busiest {size(busiest)})" if busiest > 1.01 * mean else "")
    return [label, format_time(max(r["seconds"] for r in everyone) / epochs),
            "never" if reached is None else f"{format_time(reached)} (epoch {epoch_reached})",
            f"{first['accuracy']:.3f}", sent, f"{share:.0%}"]


# ----------------------------------------------------------------------------- table 2: buckets

def bucket_caps(model, params):
    """Bucket caps from one bucket per layer (0) to one bucket for everything (None), one per layout:
    the running totals of the layer sizes in backward order."""
    sizes = [sum(params[name].nbytes for name in model.layers[layer]) for layer in reversed(range(len(model.layers)))]
    caps, layouts = [], set()
    for cap in [0, *np.cumsum(sizes[:-1]).tolist(), None]:
        layout = tuple(map(tuple, Buckets(model, params, cap).layers_of))
        if layout not in layouts:
            layouts.add(layout)
            caps.append(cap)
    return caps


def backward_layer_seconds(comm, model, params, batch_size, repeat=50):
    """Median seconds of each layer's backward (in backward order) on this rank's shard of a batch,
    every rank at once, with one BLAS thread as in training."""
    X, y, _, _ = load_digits_split()
    rows = shard_of(np.arange(batch_size), comm.size, comm.rank)
    times = []
    with one_blas_thread():
        for _ in range(repeat):
            times.append(_time_layers(model, params, X[rows], y[rows]))
    return np.median(times, axis=0)


def _time_layers(model, params, X, y):
    activations = model.forward(params, X)
    mark, layer_times = time.perf_counter(), []
    for _ in model.backward(params, activations, y):
        now = time.perf_counter()
        layer_times.append(now - mark)
        mark = now
    return layer_times


def slowest_median(comm, history, key, skip=1):
    """Median over the steps (after the first `skip`) of the slowest rank's history[key]."""
    mine = np.array([row[key] for row in history[skip:]])
    slowest = np.empty_like(mine)
    comm.Allreduce(mine, slowest, op=MPI.MAX)
    return float(np.median(slowest))


def bench_buckets(comm, args):
    model = MLP((64, *args.hidden, 10))
    params = model.init(0)
    n_floats = sum(p.size for p in params.values())
    whole, whole_out = np.random.default_rng(comm.rank).random(n_floats), np.empty(n_floats)
    layer_seconds = backward_layer_seconds(comm, model, params, args.batch_size)
    epochs_args = dict(model=model, epochs=1, batch_size=args.batch_size, lr=0.01)
    rows = []
    for cap in bucket_caps(model, params):
        buckets = Buckets(model, params, cap)
        sends, outs = [s.copy() for s in buckets.send], [r.copy() for r in buckets.received]

        def one_after_another(sends=sends, outs=outs):
            for send, out in zip(sends, outs):
                comm.Allreduce(send, out)

        measured = time_calls(comm, {"whole": lambda: comm.Allreduce(whole, whole_out),
                                     "buckets": one_after_another}, args.repeat)
        row = dict(cap=cap, nbytes=buckets.nbytes, **measured)
        for overlap in (False, True):
            result = train(comm, "bucketed", bucket_bytes=cap, overlap=overlap, **epochs_args)
            steps = result.history[:args.bucket_steps + 1]
            row[overlap] = dict(comm=slowest_median(comm, steps, "communication"),
                                step=slowest_median(comm, [dict(r, step=r["compute"] + r["communication"])
                                                           for r in steps], "step"))
        ready = np.cumsum(layer_seconds)[[positions[-1] for positions in buckets.layers_of]]
        row["ready"], row["backward"] = ready, float(np.sum(layer_seconds))
        rows.append(row)
    return model, rows


def predicted_seconds(nbytes, p):
    return costmodel.predict(costmodel.choose(nbytes, p), nbytes, p, **costmodel.DEFAULT_PARAMS)


def print_bucket_table(model, rows, p):
    total = sum(rows[0]["nbytes"])
    predicted_whole = predicted_seconds(total, p)
    lines = []
    for row in rows:
        mpi = row["whole"]
        bucket_seconds = [predicted_seconds(n, p) for n in row["nbytes"]]
        hidden = exposed_communication(bucket_seconds, row["ready"], row["backward"])
        label = ("one per layer" if row["cap"] == 0 else "one for everything" if row["cap"] is None
                 else f"cap {size(row['cap'])}")
        lines.append([f"{len(row['nbytes'])} ({label})", " + ".join(size(n) for n in row["nbytes"]),
                      f"{format_time(row['buckets'])} ({row['buckets'] / mpi:.2f}x)",
                      f"{sum(bucket_seconds) / predicted_whole:.2f}x",
                      f"{format_time(row[False]['comm'])} ({row[False]['comm'] / mpi:.2f}x)",
                      f"{format_time(row[True]['comm'])} ({row[True]['comm'] / mpi:.2f}x)",
                      f"{hidden / predicted_whole:.2f}x",
                      format_time(row[False]["step"]), format_time(row[True]["step"])])
    print(f"\nbucketing the gradient of {model.name} ({size(total)}) on {p} ranks: ratios to one MPI Allreduce of all "
          f"of it, measured in each row (median {format_time(np.median([row['whole'] for row in rows]))}; predicted "
          f"{format_time(predicted_whole)}). In training, communication includes waiting for the slowest rank; "
          f"backward pass {format_time(rows[0]['backward'])} per step")
    print_table(["buckets", "sizes (backward order)", "MPI Allreduce per bucket", "predicted",
                 "training: comm, no overlap", "comm left, overlap", "predicted left", "step, no overlap",
                 "step, overlap"], lines)


# ----------------------------------------------------------------------------- the command

def main(args):
    comm = MPI.COMM_WORLD
    require_ranks(comm, "train", 2, "a server and a worker for the parameter server, 2 ranks to average over")
    lines = []
    for label, mechanism, options in MECHANISM_RUNS:
        progress(comm, f"training with {label}")
        lines.append(mechanism_row(label, run_mechanism(comm, mechanism, options, args), args.target))
    progress(comm, "bucketed allreduce, with and without overlap")
    model, bucket_rows = bench_buckets(comm, args)
    if comm.rank == 0:
        print(f"training the MLP 64-128-10 on the digits: {comm.size} ranks, {args.epochs} epochs, global batches "
              f"of {args.batch_size}, lr {args.lr}; one run each; accuracy measured after every epoch")
        print_table(["mechanism", "time per epoch", f"time to {args.target:.2f} accuracy", "final accuracy",
                     "bytes sent per step per rank", "communication share"], lines)
        print_bucket_table(model, bucket_rows, comm.size)
