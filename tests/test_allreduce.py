"""allreduce.py against MPI's own Allreduce, under real mpiexec on 1 to 5 ranks.

One mpiexec job per rank count runs every case (algorithms x ops x dtypes x shapes, then the
bad-input cases) and returns what it found; the tests below read that job's report.
"""
import functools

import numpy as np
import pytest

from helpers import outcome
from syncml_lib.mpirun import run, run_script

RANKS = [1, 2, 3, 4, 5]
ALGORITHMS = ["naive", "tree", "recursive_doubling", "ring", "rabenseifner", "auto"]
OPS = ["sum", "prod", "max", "min"]
DTYPES = ["float32", "float64", "int32", "int64", "complex128"]
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "complex128": 1e-12}  # rtol; integers must be exact


def shapes_for(p):
    lengths = sorted({0, 1, max(p - 1, 0), p, p + 1, 10007})
    return [(n,) for n in lengths] + [(), (2, 3, p + 1), (0, 3)]


def make_input(rank, shape, dtype, op):
    """Deterministic data that differs per rank. Products of floats stay near 1; of integers, small."""
    rng = np.random.default_rng([rank, *shape, len(dtype)])
    if dtype.startswith("int"):
        low, high = (-3, 4) if op == "prod" else (-1000, 1001)
        return np.asarray(rng.integers(low, high, size=shape), dtype=dtype)
    x = rng.uniform(0.5, 1.5, size=shape)
    if dtype.startswith("complex"):
        x = x + 1j * rng.uniform(-0.5, 0.5, size=shape)
    return np.asarray(x, dtype=dtype)  # an array even for shape ()


def compare_with_mpi(comm, algorithms):
    """Every algorithm x op x dtype x shape against comm.Allreduce. Returns a list of problems."""
    from mpi4py import MPI

    from syncml_lib.allreduce import allreduce

    mpi_ops = {"sum": MPI.SUM, "prod": MPI.PROD, "max": MPI.MAX, "min": MPI.MIN}
    problems = []
    for algorithm in algorithms:
        for op in OPS:
            for dtype in DTYPES:
                if dtype.startswith("complex") and op in ("max", "min"):
                    continue  # must raise; checked in bad_inputs
                for shape in shapes_for(comm.size):
                    case = f"{algorithm} {op} {dtype} {shape}"
                    x = make_input(comm.rank, shape, dtype, op)
                    before = x.copy()
                    expected = np.empty_like(x)
                    comm.Allreduce(x, expected, op=mpi_ops[op])
                    y = allreduce(comm, x, op=op, algorithm=algorithm)
                    everyone = comm.allgather(y.tobytes())  # identical bytes on every rank?
                    if not isinstance(y, np.ndarray) or y.shape != x.shape or y.dtype != x.dtype:
                        problems.append(f"{case}: got {type(y).__name__} {getattr(y, 'shape', '')} "
                                        f"{getattr(y, 'dtype', '')} on rank {comm.rank}")
                        continue
                    if dtype.startswith("int"):
                        right = np.array_equal(y, expected)
                    else:
                        right = np.allclose(y, expected, rtol=TOLERANCE[dtype], atol=0)
                    if not right:
                        problems.append(f"{case}: differs from MPI Allreduce on rank {comm.rank}")
                    if any(theirs != everyone[0] for theirs in everyone):
                        problems.append(f"{case}: ranks got different results")
                    if not np.array_equal(x, before):
                        problems.append(f"{case}: x was modified on rank {comm.rank}")
                    if np.shares_memory(x, y):
                        problems.append(f"{case}: the result shares memory with x on rank {comm.rank}")
    return problems


def bad_inputs(comm):
    """Each bad call on every rank; returns {case: outcome on this rank}."""
    import syncml_lib.allreduce as ar

    p, rank, last = comm.size, comm.rank, comm.size - 1
    x = np.ones(4)
    cases = {
        "unknown algorithm": lambda: ar.allreduce(comm, x, algorithm="rnig"),
        "unknown op": lambda: ar.allreduce(comm, x, op="mean"),
        "a list": lambda: ar.allreduce(comm, [1.0, 2.0]),
        "a string dtype": lambda: ar.allreduce(comm, np.array(["a", "b"])),
    }
    for algorithm in ALGORITHMS:
        for op in ("max", "min"):
            cases[f"complex {op} {algorithm}"] = (
                lambda op=op, algorithm=algorithm: ar.allreduce(comm, x + 1j, op=op, algorithm=algorithm))
    if p > 1:
        cases.update({
            "shapes": lambda: ar.allreduce(comm, np.ones(5 if rank == last else 4)),
            "dtypes": lambda: ar.allreduce(comm, np.ones(4, dtype=np.float32 if rank == 0 else np.float64)),
            "ops": lambda: ar.allreduce(comm, x, op="max" if rank == 1 else "sum"),
            "algorithms": lambda: ar.allreduce(comm, x, algorithm="tree" if rank == 0 else "ring"),
            "list on one rank": lambda: ar.allreduce(comm, [1.0] * 4 if rank == last else x),
        })
    found = {case: outcome(call) for case, call in cases.items()}
    found["still works afterwards"] = outcome(lambda: ar.allreduce(comm, x))
    return found


def broken_ring_is_caught(comm):
    """With the reduce-scatter skipped, does compare_with_mpi notice? Returns its problems."""
    import syncml_lib.allreduce as ar

    original = ar.ring_reduce_scatter
    ar.ring_reduce_scatter = lambda *args, **kwargs: None
    try:
        return compare_with_mpi(comm, ["ring"])
    finally:
        ar.ring_reduce_scatter = original


def ring_phases_in_place(comm):
    """ring_reduce_scatter then ring_allgather on np.array_split views of one buffer, as a chapter
    shows them, against comm.Allreduce. Returns a list of problems."""
    from syncml_lib.allreduce import ring_allgather, ring_reduce_scatter

    problems = []
    for n in sorted({0, 1, comm.size + 1, 1000}):
        x = make_input(comm.rank, (n,), "int64", "sum")
        expected = np.empty_like(x)
        comm.Allreduce(x, expected)
        buffer = x.copy()
        chunks = np.array_split(buffer, comm.size)
        ring_reduce_scatter(comm, chunks, np.add)
        done = chunks[(comm.rank + 1) % comm.size]
        if not np.array_equal(done, np.array_split(expected, comm.size)[(comm.rank + 1) % comm.size]):
            problems.append(f"n={n}: chunk {(comm.rank + 1) % comm.size} not reduced on rank {comm.rank}")
        ring_allgather(comm, chunks)
        if not np.array_equal(buffer, expected):
            problems.append(f"n={n}: in-place ring differs from MPI Allreduce on rank {comm.rank}")
    return problems


def job(comm):
    report = {"problems": compare_with_mpi(comm, ALGORITHMS) + ring_phases_in_place(comm),
              "bad inputs": bad_inputs(comm)}
    if comm.size > 1:
        report["broken ring"] = broken_ring_is_caught(comm)
    return report


@functools.cache
def reports(p):
    return run(job, p, timeout=120)


@pytest.mark.parametrize("p", RANKS)
def test_every_algorithm_matches_mpi_allreduce(p):
    problems = sorted({problem for report in reports(p) for problem in report["problems"]})
    assert not problems, f"{len(problems)} failing cases on {p} ranks:\n" + "\n".join(problems[:50])


@pytest.mark.parametrize("p", RANKS)
def test_unknown_names_list_the_valid_ones(p):
    for report in reports(p):
        kind, message = report["bad inputs"]["unknown algorithm"]
        assert kind == "ValueError" and "rnig" in message
        for name in ALGORITHMS:
            assert name in message
        kind, message = report["bad inputs"]["unknown op"]
        assert kind == "ValueError" and "mean" in message
        for name in OPS:
            assert name in message


@pytest.mark.parametrize("p", RANKS)
def test_non_arrays_and_complex_max_min_are_refused(p):
    for report in reports(p):
        found = report["bad inputs"]
        assert found["a list"][0] == "TypeError" and "numpy array" in found["a list"][1]
        assert found["a string dtype"][0] == "TypeError"
        for algorithm in ALGORITHMS:
            for op in ("max", "min"):
                kind, message = found[f"complex {op} {algorithm}"]
                assert kind == "ValueError" and "complex" in message
        assert found["still works afterwards"] is None


def ranks_text(ranks):
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_disagreeing_ranks_raise_everywhere_and_are_named(p):
    last = p - 1
    others = [r for r in range(p) if r != last]
    expected = {
        "shapes": f"shapes differ across ranks: (4,) on {ranks_text(others)}; (5,) on rank {last}",
        "dtypes": f"dtypes differ across ranks: 'float32' on rank 0; 'float64' on {ranks_text(list(range(1, p)))}",
        "ops": f"ops differ across ranks: 'sum' on {ranks_text([r for r in range(p) if r != 1])}; 'max' on rank 1",
        "algorithms": f"algorithms differ across ranks: 'tree' on rank 0; 'ring' on {ranks_text(list(range(1, p)))}",
        "list on one rank": f"types differ across ranks: 'ndarray' on {ranks_text(others)}; 'list' on rank {last}",
    }
    for rank, report in enumerate(reports(p)):
        for case, text in expected.items():
            got = report["bad inputs"][case]
            assert got is not None, f"rank {rank} did not raise for different {case}"
            assert got[0] == "ValueError", f"rank {rank}, {case}: {got}"
            assert text in got[1], f"rank {rank}, {case}: {got[1]!r} does not contain {text!r}"


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_a_broken_ring_is_caught(p):
    for report in reports(p):
        assert report["broken ring"], "skipping the reduce-scatter went unnoticed"


def test_the_benchmark_runs_and_prints_a_row_per_size():
    proc = run_script(["-m", "syncml_lib.bench", "allreduce", "--sizes", "8", "1K", "64K", "--repeat", "2"],
                      n=2, timeout=60)
    rows = [line for line in proc.stdout.splitlines() if line.lstrip().startswith(("8 B |", "1 KB |", "64 KB |"))]
    assert len(rows) == 3, proc.stdout
    assert "auto picked" in proc.stdout and "MPI Allreduce" in proc.stdout
