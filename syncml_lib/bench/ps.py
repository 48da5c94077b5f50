"""`bench ps`: the parameter server against an allreduce among its workers (chapter 02).

    make bench BENCH=ps                       # 8 MB model, 30 steps, ~15 s
    make bench BENCH=ps BENCH_ARGS="--size 10000 --steps 3 --rounds 1"
The parameter server (parameter_server.py) with 1 and with 2 servers (the other ranks are workers),
BSP and ASP, against an allreduce of the same gradient among the workers only (ring_allreduce and
comm.Allreduce on a communicator of the W workers). grad_fn returns a fixed precomputed array, so the
step time is all communication and bookkeeping. The table compares the measured PS / ring ratio with
costmodel.predict_ps / predict("ring"), under costmodel.DEFAULT_PARAMS and under constants calibrated
in the same run (see predict_ps_row). A configuration needs 2 workers (an allreduce among one worker
has nothing to do, nothing to compare with): on 3 ranks the 2-server ones are skipped, and fewer than
3 ranks are refused.
"""
import os
import time

import numpy as np
from mpi4py import MPI

from .. import costmodel
from ..allreduce import ring_allreduce
from ..parameter_server import run_parameter_server
from ..rpc import wait_sleeping
from .common import THROTTLE, format_size, format_time, parse_size, print_table, progress, progress_throttle, \
    repeats_for, require_ranks, time_calls

PS_CONFIGS = [(1, "bsp"), (1, "asp"), (2, "bsp"), (2, "asp")]  # (servers, mode)
MIN_WORKERS = 2  # an allreduce among fewer workers has nothing to do: nothing to compare the PS with
TINY = 64 * 8  # bytes of the tiny model whose step time measures the per-message cost


def ps_step_time(history):
    """Median time between the ends of consecutive steps (a step ends when its last worker is
    done), over steps 1, 2, ...: step 0 is a warm-up. In ASP, the slowest worker's pace."""
    steps = sorted({row["step"] for row in history})
    finish = np.array([max(row["end"] for row in history if row["step"] == t) for t in steps])
    return float(np.median(np.diff(finish)))


def time_ps(comm, nbytes, n_servers, mode, steps):
    """(step time, bytes through each server per step) of run_parameter_server with a model of
    nbytes whose grad_fn returns a fixed precomputed gradient (no compute)."""
    grad = {"w": np.random.default_rng(1).standard_normal(nbytes // 8)}
    comm.Barrier()
    result = run_parameter_server(comm, {"w": np.zeros(nbytes // 8)}, lambda params, worker, step: grad,
                                  steps=steps, lr=0.01, mode=mode, n_servers=n_servers)
    return ps_step_time(result.history), [(b["sent"] + b["received"]) / steps for b in result.server_bytes]


def time_allreduce_among_workers(comm, n_servers, nbytes, repeat):
    """{name: seconds} of ring_allreduce and comm.Allreduce of nbytes among the ranks n_servers..p-1
    only (the workers of a parameter server with n_servers servers), the same on every rank.
    The server ranks sleep meanwhile."""
    is_worker = comm.rank >= n_servers
    workers = comm.Split(0 if is_worker else MPI.UNDEFINED, comm.rank)
    times = None
    if is_worker:
        x = np.random.default_rng(comm.rank).random(nbytes // 8)
        out = np.empty_like(x)
        times = time_calls(workers, {"ring": lambda: ring_allreduce(workers, x),
                                     "MPI Allreduce": lambda: workers.Allreduce(x, out)}, repeat)
        workers.Free()
    wait_sleeping(comm.Ibarrier(), interval=1e-3)  # idle while the others are timed: look seldom
    return comm.bcast(times, root=n_servers)


def measure_server_pass(comm, nbytes, repeat=10):
    """Seconds per byte of one numpy pass over nbytes of fresh memory (c = a + b, c *= 0.5,
    a.copy(): what a server does to its slice) on rank 0 while the other ranks sleep, as the
    waiting ranks of a parameter server do (rpc.py). Mean, not median: the server's work is long
    enough to be preempted, and that is the point. The same on every rank."""
    cost = None
    if comm.rank == 0:
        a, b = np.random.random(nbytes // 8), np.random.random(nbytes // 8)
        start = time.perf_counter()
        for _ in range(repeat):
            c = a + b
            c *= 0.5
            a.copy()
        cost = (time.perf_counter() - start) / (3 * repeat) / a.nbytes
    wait_sleeping(comm.Ibarrier(), interval=1e-3)  # idle while the others are timed: look seldom
    return comm.bcast(cost, root=0)


def servers_label(s):
    return f"{s} server{'s' if s > 1 else ''}"


def configs_for(p):
    """(the configurations of PS_CONFIGS that run on p ranks, a note for each number of servers skipped)."""
    run = [(s, mode) for s, mode in PS_CONFIGS if p - s >= MIN_WORKERS]
    skipped = sorted({s for s, _ in PS_CONFIGS} - {s for s, _ in run})
    return run, [f"{servers_label(s)} on {p} ranks leaves {p - s} worker{'' if p - s == 1 else 's'}: no allreduce "
                 f"among the workers to compare with; skipped" for s in skipped]


def bench_ps(comm, nbytes, steps, repeat, rounds, configs=PS_CONFIGS):
    """One row per (servers, mode) in configs: the parameter server's step time and bytes through
    each server per step; the allreduce times among the same workers; and, to calibrate the cost
    model in this run, the same at a tiny size (per-message cost) and the server's cost per pass.
    The parameter-server runs take turns, `rounds` of each, and each keeps its median: how the ranks
    happen to share the cores differs from run to run, by up to 1.5x on a 2-core machine."""
    runs = {config: [] for config in configs}
    for round_ in range(rounds):
        for n_servers, mode in configs:
            progress(comm, f"{servers_label(n_servers)} {mode.upper()}, round {round_ + 1} of {rounds}")
            step, server_bytes = time_ps(comm, nbytes, n_servers, mode, steps)
            tiny_step, _ = time_ps(comm, TINY, n_servers, mode, steps)
            runs[n_servers, mode].append((step, tiny_step, server_bytes))
    rows = []
    for (n_servers, mode), measured in runs.items():
        ring = time_allreduce_among_workers(comm, n_servers, nbytes, repeat)
        tiny_ring = time_allreduce_among_workers(comm, n_servers, TINY, repeat)["ring"]
        rows.append(dict(servers=n_servers, workers=comm.size - n_servers, mode=mode, nbytes=nbytes,
                         step=float(np.median([m[0] for m in measured])),
                         tiny_step=float(np.median([m[1] for m in measured])), server_bytes=measured[0][2],
                         tiny_ring=tiny_ring, server_pass=measure_server_pass(comm, nbytes // n_servers), **ring))
    return rows


def predict_ps_row(row):
    """(predicted PS/ring with DEFAULT_PARAMS, predicted PS/ring calibrated in this run, the latter's
    parameters). Calibrated: alpha of each side from its tiny-model time (divided by its number of
    messages in sequence: 4 max(W, S) for the PS, 2 (W-1) for the ring); beta from DEFAULT_PARAMS and
    gamma from measure_server_pass (the PS) or DEFAULT_PARAMS (the ring), moved to the ranks that are
    busy at once on this machine's cores (costmodel.on_cores). In the ring that is the W workers (the
    servers sleep); in the parameter server it is each server and the worker it is serving,
    2 min(W, S), because ranks waiting for a request or a reply sleep (rpc.py)."""
    w, s, n = row["workers"], row["servers"], row["nbytes"]
    d = costmodel.DEFAULT_PARAMS
    default = costmodel.ps_over_ring(n, w, s, **d, mode=row["mode"])
    cores = len(os.sched_getaffinity(0))
    busy = 2 * min(w, s)
    ps_params, ring_params = costmodel.on_cores(d, busy, cores), costmodel.on_cores(d, w, cores)
    server_gamma = costmodel.on_cores(dict(beta=0, gamma=row["server_pass"]), busy, cores,
                                      fitted_on=dict(ranks=1, cores=cores))["gamma"]  # measured alone
    ps_alpha = row["tiny_step"] / (4 * max(w, s))
    ring_alpha = row["tiny_ring"] / (2 * (w - 1))
    ps = costmodel.predict_ps(n, w, s, ps_alpha, ps_params["beta"], server_gamma, row["mode"])
    ring = costmodel.predict("ring", n, w, ring_alpha, ring_params["beta"], ring_params["gamma"])
    return default, ps / ring, dict(ps_alpha=ps_alpha, ring_alpha=ring_alpha, server_gamma=row["server_pass"],
                                    ps=ps, ring=ring)


def print_ps_table(rows, p, steps, rounds):
    header = ["config", "workers", "servers", "PS step time", "ring allreduce (same W)", "MPI Allreduce",
              "measured PS/ring", "predicted (DEFAULT_PARAMS)", "predicted (calibrated)", "measured/predicted",
              "bytes per server per step"]
    lines, notes = [], []
    for row in rows:
        measured = row["step"] / row["ring"]
        default, calibrated, fit = predict_ps_row(row)
        s = row["servers"]
        lines.append([f"{servers_label(s)} {row['mode'].upper()}", row["workers"], s,
                      format_time(row["step"]), format_time(row["ring"]), format_time(row["MPI Allreduce"]),
                      f"{measured:.2f}", f"{default:.2f}", f"{calibrated:.2f}", f"{measured / calibrated:.2f}x",
                      " + ".join(format_size(round(b)) for b in row["server_bytes"])])
        verdict = "within" if 1 / 1.5 <= measured / calibrated <= 1.5 else "NOT within"
        notes.append(f"{lines[-1][0]}: measured {measured:.2f} vs calibrated {calibrated:.2f} -> {verdict} 1.5x "
                     f"(with DEFAULT_PARAMS: measured/predicted {measured / default:.2f}x). PS step {format_time(fit['ps'])} predicted, "
                     f"ring {format_time(fit['ring'])}; per-message alpha PS {format_time(fit['ps_alpha'])}, "
                     f"ring {format_time(fit['ring_alpha'])}; server pass {fit['server_gamma']:.2g} s/B")
    print(f"parameter server vs ring allreduce among the workers only: {format_size(rows[0]['nbytes'])} "
          f"of float64, {p} ranks, {steps} steps (the first is a warm-up); PS step: median time between "
          f"step ends, median over {rounds} runs; allreduce: median of the slowest worker's time; {THROTTLE}="
          f"{progress_throttle()}")
    print_table(header, lines)
    d = costmodel.DEFAULT_PARAMS
    print(f"\npredicted PS/ring = costmodel.predict_ps(n, W, S) / predict('ring', n, p=W). DEFAULT_PARAMS: "
          f"alpha={d['alpha']:.2g}, beta={d['beta']:.2g}, gamma={d['gamma']:.2g} for both. Calibrated in this "
          f"run: alpha of each from its step time with a {TINY} B model; beta from DEFAULT_PARAMS and the server's "
          f"gamma from a pass over fresh memory while the other ranks sleep, both moved to the ranks busy at once on "
          f"this machine's cores (costmodel.on_cores: in the PS 2 min(W, S), each server and the worker it serves; "
          f"in the ring the W workers). Target: within 1.5x")
    for note in notes:
        print(note)


def main(args):
    comm = MPI.COMM_WORLD
    require_ranks(comm, "ps", min(s for s, _ in PS_CONFIGS) + MIN_WORKERS,
                  f"a server and {MIN_WORKERS} workers, so that an allreduce among the workers has something to do")
    configs, skipped = configs_for(comm.size)
    if comm.rank == 0:
        for note in skipped:
            print(f"bench ps: {note}", flush=True)
    nbytes = parse_size(args.size) // 8 * 8
    rows = bench_ps(comm, nbytes, args.steps, repeats_for(nbytes, args.repeat), args.rounds, configs)
    if comm.rank == 0:
        print_ps_table(rows, comm.size, args.steps, args.rounds)
