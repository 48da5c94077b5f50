"""Benchmarks of the course's synchronization code against MPI's own.

    make bench BENCH=allreduce   # allreduce.py's algorithms vs comm.Allreduce (chapter 03)
    make bench BENCH=ps          # the parameter server vs a ring among its workers (chapter 02)
    make bench BENCH=data        # scatter_rows and the key-value store vs bare MPI (chapter 04)
    make bench BENCH=tasks       # the task master vs MPI's scatter and gather (chapter 05)
    make bench BENCH=train       # one model trained with every mechanism, bucketing (chapter 06)
    make bench BENCH=sync        # barriers and shared updates vs MPI Barrier and Accumulate (chapter 01)
    python -m syncml_lib.bench engines                  # EngineScheduler vs ipyparallel's load-balanced view (chapter 05b)
    make bench BENCH=scaling     # step time over 1..4 ranks, hierarchical, compression (chapter 07)

From Python, main(["ps", "--steps", "3"]) does the same. One module per benchmark (its docstring says
what it measures and how), common.py what they share (sizes, timing, tables, rank counts, MPICH's
progress throttle), __main__.py the command line.
"""


def main(argv=None):
    """Run a benchmark as the command line does, e.g. main(["ps", "--size", "1M"]) on every rank."""
    from .__main__ import main as command_line  # imported here: `python -m` runs __main__ itself

    return command_line(argv)
