"""hierarchical_allreduce against MPI's own Allreduce, under real mpiexec on 1 to 5 ranks, for every
way of grouping the ranks into nodes (every set partition), every op, integer and float data, odd lengths."""
import functools

import numpy as np
import pytest

from helpers import outcome
from syncml_lib.mpirun import run

RANKS = [1, 2, 3, 4, 5]
OPS = ["sum", "prod", "max", "min"]


def set_partitions(p):
    """Every grouping of ranks 0..p-1 into nodes, as a list nodes[r] (Bell(p) of them: 52 for p = 5)."""
    if p == 0:
        return [[]]
    groupings = []
    for rest in set_partitions(p - 1):
        for node in range(max(rest, default=-1) + 2):  # join an existing node, or open a new one
            groupings.append(rest + [node])
    return groupings


def relabelled(nodes):
    """The same grouping with other node ids (large, negative, not in rank order)."""
    return [1000 - 7 * node for node in nodes]


def compare_with_mpi(comm):
    from mpi4py import MPI

    from syncml_lib.allreduce import hierarchical_allreduce

    mpi_ops = {"sum": MPI.SUM, "prod": MPI.PROD, "max": MPI.MAX, "min": MPI.MIN}
    problems, cases = [], 0
    for nodes in set_partitions(comm.size):
        for grouping in (nodes, relabelled(nodes)):
            for op in OPS:
                for dtype in ("int64", "float64"):
                    for n in sorted({0, 1, comm.size + 2, 1001}):
                        rng = np.random.default_rng([comm.rank, n, len(op)])
                        if dtype == "int64":
                            x = rng.integers(-3, 4, size=n) if op == "prod" else rng.integers(-1000, 1001, size=n)
                        else:
                            x = rng.uniform(0.5, 1.5, size=n)
                        expected = np.empty_like(x)
                        comm.Allreduce(x, expected, op=mpi_ops[op])
                        y = hierarchical_allreduce(comm, x, op=op, nodes=grouping)
                        same = np.array_equal(y, expected) if dtype == "int64" else np.allclose(y, expected, rtol=1e-12)
                        agree = len(set(comm.allgather(y.tobytes()))) == 1
                        cases += 1
                        if not (same and agree and y.dtype == x.dtype and y.shape == x.shape):
                            problems.append(f"nodes {grouping} {op} {dtype} n={n}: rank {comm.rank} "
                                            f"{'differs from MPI' if not same else 'ranks disagree'}")
    x = np.arange(6.0).reshape(2, 3) + comm.rank
    expected = np.empty_like(x)
    comm.Allreduce(x, expected)
    if not np.allclose(hierarchical_allreduce(comm, x), expected):  # the default grouping, two per node
        problems.append(f"default nodes, shape (2, 3): rank {comm.rank} differs from MPI")
    return problems, cases


def bad_inputs(comm):
    from syncml_lib.allreduce import hierarchical_allreduce

    p, rank = comm.size, comm.rank
    x = np.ones(4)
    cases = {
        "a rank missing": lambda: hierarchical_allreduce(comm, x, nodes=[0] * (p - 1)),
        "an extra rank": lambda: hierarchical_allreduce(comm, x, nodes=[0] * (p + 1)),
        "not node ids": lambda: hierarchical_allreduce(comm, x, nodes=["a"] * p),
        "not a list": lambda: hierarchical_allreduce(comm, x, nodes=0),
        "a list for x": lambda: hierarchical_allreduce(comm, [1.0, 2.0]),
        "unknown op": lambda: hierarchical_allreduce(comm, x, op="mean"),
        "complex max": lambda: hierarchical_allreduce(comm, x + 1j, op="max"),
    }
    if p > 1:
        cases["nodes differ"] = lambda: hierarchical_allreduce(comm, x, nodes=[rank] * p)
        cases["shapes differ"] = lambda: hierarchical_allreduce(comm, np.ones(5 if rank == p - 1 else 4))
    found = {case: outcome(call) for case, call in cases.items()}
    found["still works afterwards"] = outcome(lambda: hierarchical_allreduce(comm, x, nodes=list(range(p))))
    return found


def job(comm):
    problems, cases = compare_with_mpi(comm)
    return {"problems": problems, "cases": cases, "bad inputs": bad_inputs(comm)}


@functools.cache
def reports(p):
    return run(job, p, timeout=120)


def test_set_partitions_are_every_grouping():
    assert [len(set_partitions(p)) for p in range(1, 6)] == [1, 2, 5, 15, 52]  # the Bell numbers
    assert len({tuple(g) for g in set_partitions(4)}) == 15


@pytest.mark.parametrize("p", RANKS)
def test_equals_mpi_allreduce_for_every_grouping(p):
    problems = sorted({problem for report in reports(p) for problem in report["problems"]})
    assert not problems, f"{len(problems)} failing cases on {p} ranks:\n" + "\n".join(problems[:40])
    assert reports(p)[0]["cases"] == 2 * len(set_partitions(p)) * len(OPS) * 2 * len({0, 1, p + 2, 1001})


@pytest.mark.parametrize("p", RANKS)
def test_bad_input_is_refused_on_every_rank(p):
    expected = {
        "a rank missing": ("ValueError", f"nodes has {p - 1} entries for {p} ranks: rank {p - 1} has no node"),
        "an extra rank": ("ValueError", f"nodes has {p + 1} entries for {p} ranks: there is no rank {p}"),
        "not node ids": ("ValueError", "list of integer node ids"),
        "not a list": ("ValueError", "list of integer node ids"),
        "a list for x": ("TypeError", "numpy array"),
        "unknown op": ("ValueError", "unknown op 'mean'"),
        "complex max": ("ValueError", "not defined for complex"),
    }
    if p > 1:
        expected["nodes differ"] = ("ValueError", "nodes differ across ranks")
        expected["shapes differ"] = ("ValueError", "shapes differ across ranks")
    for rank, report in enumerate(reports(p)):
        for case, (kind, text) in expected.items():
            got = report["bad inputs"][case]
            assert got is not None and got[0] == kind and text in got[1], f"rank {rank}, {case}: {got}"
        assert report["bad inputs"]["still works afterwards"] is None
