"""The command line: `python -m syncml_lib.bench allreduce|ps|data|tasks|train|sync|engines|scaling [options]` (or main(argv)).

It parses the options, puts the course's MPI settings into the environment (syncml_lib.mpienv: shared
memory only on one machine, MPICH's progress throttle for the benchmarks that want it), and only then
imports the benchmark's module, which starts MPI (mpi4py.MPI initializes it when imported).
"""
import argparse
import importlib
import sys

from . import __doc__ as PACKAGE_DOC
from .. import mpienv
from .common import THROTTLE, progress_throttle

DEFAULT_SIZES = ["8", "64", "1K", "8K", "64K", "1M", "8M", "64M"]
DATA_SIZES = ["64K", "1M", "8M"]

# In `ps`, `data`, `tasks` and `train` a parameter server's ranks (a key-value store's, a task master's) wait
# for requests and replies asleep (rpc.py), but inside an MPI call (a big array under way, an allreduce
# among the workers) MPICH waits by spinning. With more ranks than cores that takes the cores from the
# ranks that have work, unless MPICH's progress throttle makes an idle rank yield; the course's engines
# and mpirun turn it on for the same reason. (`allreduce` runs without it: every rank there is busy, and
# its tables were measured so.)
THROTTLED = {"ps", "data", "tasks", "train", "sync", "scaling"}


def parser():
    parser = argparse.ArgumentParser(prog="python -m syncml_lib.bench", description=PACKAGE_DOC.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    allreduce = commands.add_parser("allreduce", help="our allreduce algorithms against MPI's")
    allreduce.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                           help="message sizes in bytes, e.g. 8 1K 8M (default: %(default)s)")
    allreduce.add_argument("--max-size", default="64M", help="skip sizes above this (default: 64M)")
    allreduce.add_argument("--repeat", type=int, default=200,
                           help="repeats per measurement, fewer for large sizes (default: 200)")
    allreduce.add_argument("--fit", action="store_true", help="also fit the cost model's alpha and beta to the times")

    ps = commands.add_parser("ps", help="the parameter server against an allreduce among its workers")
    ps.add_argument("--size", default="8M", help="model size in bytes, float64 (default: 8M, 1M floats)")
    ps.add_argument("--steps", type=int, default=30,
                    help="steps per configuration; the first is a warm-up (default: 30)")
    ps.add_argument("--rounds", type=int, default=5,
                    help="parameter-server runs per configuration, in turns; the median counts (default: 5)")
    ps.add_argument("--repeat", type=int, default=50, help="allreduce repeats, fewer for large sizes (default: 50)")

    data = commands.add_parser("data", help="scatter and the key-value store against bare MPI")
    data.add_argument("--sizes", nargs="+", default=DATA_SIZES,
                      help="bytes per scatter, per key-value array (default: %(default)s)")
    data.add_argument("--repeat", type=int, default=100,
                      help="repeats per measurement, fewer for large sizes (default: 100)")

    tasks = commands.add_parser("tasks", help="the task master against MPI's scatter and gather")
    tasks.add_argument("--tasks", type=int, default=300, help="tasks per run (default: 300)")
    tasks.add_argument("--repeat", type=int, default=15,
                       help="runs per measurement of empty tasks, a fifth of it for 1 ms tasks (default: 15)")

    training = commands.add_parser("train", help="one model trained with every mechanism; bucketing and overlap")
    training.add_argument("--epochs", type=int, default=10, help="epochs per mechanism (default: %(default)s)")
    training.add_argument("--batch-size", type=int, default=32, help="global batch size (default: %(default)s)")
    training.add_argument("--lr", type=float, default=0.2, help="learning rate (default: %(default)s)")
    training.add_argument("--target", type=float, default=0.95, help="test accuracy to time (default: %(default)s)")
    training.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256],
                          help="hidden layers of the MLP whose gradient is bucketed (default: %(default)s)")
    training.add_argument("--bucket-steps", type=int, default=40,
                          help="training steps timed per bucket layout, after a warm-up step (default: %(default)s)")
    training.add_argument("--repeat", type=int, default=50, help="repeats of the bare allreduces (default: %(default)s)")

    sync = commands.add_parser("sync", help="barriers and shared updates against MPI's Barrier and Accumulate")
    sync.add_argument("--steps", type=int, default=200, help="steps per barrier run (default: %(default)s)")
    sync.add_argument("--rounds", type=int, default=100, help="rounds of updates per run (default: %(default)s)")
    sync.add_argument("--repeat", type=int, default=7, help="runs per measurement (default: %(default)s)")

    engines = commands.add_parser("engines", help="EngineScheduler against ipyparallel's load-balanced view "
                                  "(plain engines, no mpiexec)")
    engines.add_argument("--engines", type=int, default=4, help="plain engines to start (default: %(default)s)")
    engines.add_argument("--tasks", type=int, default=1000, help="empty tasks per throughput run (default: %(default)s)")
    engines.add_argument("--repeat", type=int, default=7,
                         help="runs per throughput and makespan measurement (default: %(default)s)")

    scaling = commands.add_parser("scaling", help="chapter 07: step time over 1..p ranks beside the cost model, "
                                  "hierarchical against flat allreduce, gradient compression")
    scaling.add_argument("--epochs", type=int, default=4, help="epochs per training run (default: %(default)s)")
    scaling.add_argument("--sizes", nargs="+", default=["8", "1K", "64K", "1M", "8M"],
                         help="allreduce sizes for hierarchical against flat (default: %(default)s)")
    scaling.add_argument("--repeat", type=int, default=50,
                         help="repeats per allreduce measurement, fewer for large sizes (default: %(default)s)")

    # Another benchmark: its subparser here, and a module of its own beside these with main(args).
    return parser


def main(argv=None):
    """Parse argv (sys.argv[1:] if None); put the course's MPI settings (mpienv: shared memory only on
    one machine; the throttle for THROTTLED) into the environment if MPI has not started yet, else warn
    of an unthrottled MPI; run the benchmark's main(args) on every rank."""
    args = parser().parse_args(argv)
    mpi = sys.modules.get("mpi4py.MPI")
    started_before = mpi is not None and mpi.Is_initialized()
    # MPICH and UCX read them when MPI starts, the import below: shared memory only on one machine
    # (mpienv), and the throttle for the benchmarks that want it
    mpienv.set_in_this_process(throttle=args.command in THROTTLED)
    benchmark = importlib.import_module(f".{args.command}", __package__)
    if args.command in THROTTLED:
        warn_if_unthrottled(args.command, started_before)
    benchmark.main(args)


def warn_if_unthrottled(command, started_before):
    """One line on rank 0's stderr if MPI runs without the progress throttle: the times then measure
    idle ranks spinning on the cores of the busy ones, not what the README's tables show."""
    from mpi4py import MPI

    value = progress_throttle()
    if value != "1" and MPI.COMM_WORLD.rank == 0:
        why = ("MPI started before bench.main could turn it on: set it in the environment before importing "
               "mpi4py.MPI" if started_before else "as the environment asks")
        print(f"bench {command}: warning: MPICH's progress throttle is off ({THROTTLE}={value}), {why}; idle ranks "
              f"spin inside MPI and take the cores of the busy ones", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
