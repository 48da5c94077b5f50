"""`bench scaling`: chapter 07's measurements (performance and open problems).

    make bench BENCH=scaling             # about half a minute
    make bench BENCH=scaling BENCH_ARGS="--sizes 1K 1M --epochs 2"
Three tables:
1. chapter 06's training step (the digits MLP, and the wider one of chapter 07) on the first 1 .. p
   ranks: strong scaling (a global batch of 240) and weak scaling (60 examples per rank), the median
   step of the slowest rank beside the cost model (costmodel.predict_step, fed with the compute per
   example and the fixed cost of a step fitted to the two 1-rank runs, DEFAULT_PARAMS and the machine's
   cores);
2. hierarchical_allreduce (two ranks per node) against the flat ring, each with its ratio to MPI's own
   Allreduce measured in the same rounds (bench/common.time_calls), in pairs that make the same checks
   (hierarchy_calls);
3. every compressor of compression.py in chapter 06's training: bytes sent per rank per step, the
   saving, test accuracy, and the step time.
"""
import os

import numpy as np
from mpi4py import MPI

from .. import costmodel
from ..allreduce import allreduce, allreduce_in_levels, hierarchical_allreduce, split_nodes, two_per_node
from ..compression import Int8, LowRank, Sign, TopK
from ..scaling import WIDE, measure_step
from ..training import get_model, train
from .common import format_size, format_time, parse_size, print_table, progress, repeats_for, require_ranks, time_calls

STRONG_BATCH, PER_RANK = 240, 60
COMPRESSORS = {"none": None, "top-k 1%, error feedback": lambda: TopK(0.01),
               "top-k 1%, no error feedback": lambda: TopK(0.01, error_feedback=False), "8-bit": Int8,
               "sign, error feedback": Sign, "sign, no error feedback": lambda: Sign(error_feedback=False),
               "low-rank r=1": lambda: LowRank(rank=1), "low-rank r=2": lambda: LowRank(rank=2)}


def scaling_rows(comm, model, epochs):
    """Strong and weak scaling of `model` on 1 .. comm.size ranks, with the cost model beside each."""
    strong = [measure_step(comm, p, model=model, batch_size=STRONG_BATCH, epochs=epochs) for p in range(1, comm.size + 1)]
    weak = [measure_step(comm, p, model=model, batch_size=PER_RANK * p, epochs=epochs) for p in range(1, comm.size + 1)]
    nbytes = 8 * (sum(value.size for value in model.init(0).values()) + 1)  # the gradient and the example count
    # compute = o + c * examples, fitted to the two 1-rank runs (240 and 60 examples): o is the step's fixed cost
    per_example = (strong[0]["compute"] - weak[0]["compute"]) / (STRONG_BATCH - PER_RANK)
    overhead = strong[0]["step"] - STRONG_BATCH * per_example
    cores = os.cpu_count() or 1

    def model_step(p, batch):
        return costmodel.predict_step("ring", p, batch, per_example, nbytes, overhead=overhead, cores=cores,
                                      **costmodel.on_cores(costmodel.DEFAULT_PARAMS, ranks=p, cores=cores))

    return [dict(ranks=s["ranks"], strong=s["step"], strong_model=model_step(s["ranks"], STRONG_BATCH),
                 speedup=strong[0]["step"] / s["step"], weak_batch=w["batch"], weak=w["step"],
                 weak_model=model_step(w["ranks"], w["batch"]), efficiency=weak[0]["step"] / w["step"])
            for s, w in zip(strong, weak)]


def print_scaling(name, rows):
    print(f"\n{name}: the median step of the slowest rank on the first p ranks (cost model in brackets); strong: "
          f"global batch {STRONG_BATCH}; weak: {PER_RANK} examples per rank")
    print_table(["ranks", "strong: step", "speedup", "weak: batch", "step", "efficiency"],
                [[r["ranks"], f"{format_time(r['strong'])} ({format_time(r['strong_model'])})", f"{r['speedup']:.2f}x",
                  r["weak_batch"], f"{format_time(r['weak'])} ({format_time(r['weak_model'])})",
                  f"{r['efficiency']:.2f}"] for r in rows])


def hierarchy_calls(comm, node_comm, leaders_comm, x, out, nodes):
    """The allreduces timed against each other, in pairs that do the same checks (like for like):

        flat ring            allreduce(check=False)     against  levels (allreduce_in_levels: no checks,
                                                                 communicators split once and kept)
        flat ring, checked   allreduce(check=True)      against  hierarchical (hierarchical_allreduce: the
                             (one pickled allgather)             same allgather, and two comm.Split per call)
        MPI Allreduce        comm.Allreduce(x, out), checking nothing either

    node_comm and leaders_comm come from split_nodes(comm, nodes). Each call is collective on comm."""
    return {"MPI Allreduce": lambda: comm.Allreduce(x, out),
            "flat ring": lambda: allreduce(comm, x, algorithm="ring", check=False),
            "levels": lambda: allreduce_in_levels(node_comm, leaders_comm, x),
            "flat ring, checked": lambda: allreduce(comm, x, algorithm="ring", check=True),
            "hierarchical": lambda: hierarchical_allreduce(comm, x, nodes=nodes)}


def hierarchical_rows(comm, sizes, repeat, nodes=None):
    """For each size in bytes, {name: median seconds of the slowest rank} of every hierarchy_calls call,
    all timed in the same rounds (bench/common.time_calls), and nbytes. Chapter 07 runs this too."""
    nodes = two_per_node(comm.size) if nodes is None else list(nodes)
    node_comm, leaders_comm = split_nodes(comm, nodes)  # kept for "levels"
    rows = []
    try:
        for nbytes in sizes:
            x = np.random.default_rng(comm.rank).random(max(1, nbytes // 8))
            out = np.empty_like(x)
            row = time_calls(comm, hierarchy_calls(comm, node_comm, leaders_comm, x, out, nodes), repeats_for(nbytes, repeat))
            rows.append(dict(row, nbytes=x.nbytes))
    finally:
        node_comm.Free()
        if leaders_comm is not None:
            leaders_comm.Free()
    return rows


def print_hierarchical(rows, p):
    nodes = two_per_node(p)
    print(f"\nhierarchical allreduce, nodes {nodes}, against the flat ring on {p} ranks: median of the slowest rank "
          f"(ratio to MPI Allreduce, same rounds), each pair with the same checks: allreduce_in_levels (communicators "
          f"split once, no checks) against the ring with check=False; hierarchical_allreduce (one allgather of "
          f"checks, two comm.Split per call) against the ring with check=True")
    print_table(["size", "MPI Allreduce", "flat ring", "allreduce_in_levels", "levels / flat", "flat ring, checked",
                 "hierarchical_allreduce", "hierarchical / checked"],
                [[format_size(r["nbytes"]), format_time(r["MPI Allreduce"]),
                  *(f"{format_time(r[k])} ({r[k] / r['MPI Allreduce']:.2f}x)" for k in ("flat ring", "levels")),
                  f"{r['levels'] / r['flat ring']:.2f}x",
                  *(f"{format_time(r[k])} ({r[k] / r['MPI Allreduce']:.2f}x)" for k in ("flat ring, checked", "hierarchical")),
                  f"{r['hierarchical'] / r['flat ring, checked']:.2f}x"] for r in rows])


def compression_rows(comm, epochs):
    settings = dict(model="mlp", epochs=epochs, batch_size=32, lr=0.2, seed=0)
    rows = []
    for label, make in COMPRESSORS.items():
        result = train(comm, "allreduce", compression=make() if make else None, **settings)
        steps = result.history[1:]
        sent = comm.allreduce(np.mean([row["bytes_sent"] for row in result.history]), op=MPI.MAX)
        step = comm.allreduce(float(np.median([row["compute"] + row["communication"] for row in steps])), op=MPI.MAX)
        rows.append(dict(label=label, sent=sent, accuracy=result.test_accuracy, step=step))
    return rows


def print_compression(rows, p, epochs):
    plain = rows[0]
    print(f"\ngradient compression in chapter 06's training: mlp 64-128-10 (9,610 parameters), {p} ranks, {epochs} "
          f"epochs, batches of 32, lr 0.2, the same seeded batches for every method")
    print_table(["compression", "bytes sent per rank per step", "saved", "test accuracy", "vs none", "step (slowest rank)"],
                [[r["label"], f"{r['sent']:,.0f}", f"{plain['sent'] / r['sent']:.0f}x", f"{r['accuracy']:.3f}",
                  f"{100 * (r['accuracy'] - plain['accuracy']):+.1f} points", format_time(r["step"])] for r in rows])


def main(args):
    comm = MPI.COMM_WORLD
    require_ranks(comm, "scaling", 2, "scaling needs more than one rank")
    scaling = {}
    for name, model in (("digits MLP 64-128-10", get_model("mlp")), ("wide MLP 64-256-256-10", WIDE)):
        progress(comm, f"strong and weak scaling of the {name}")
        scaling[f"{name} ({sum(v.size for v in model.init(0).values()):,} parameters)"] = \
            scaling_rows(comm, model, args.epochs)
    progress(comm, "hierarchical against flat allreduce")
    hierarchical = hierarchical_rows(comm, [parse_size(s) for s in args.sizes], args.repeat)
    progress(comm, "gradient compression")
    compression = compression_rows(comm, args.epochs)
    if comm.rank == 0:
        for name, rows in scaling.items():
            print_scaling(name, rows)
        print_hierarchical(hierarchical, comm.size)
        print_compression(compression, comm.size, args.epochs)
