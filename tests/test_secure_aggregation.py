"""secure_aggregation.py under real mpiexec on 1 to 5 ranks.

One mpiexec job per rank count runs every case (sums against MPI's Allreduce, the masks, dropout, the
bad inputs, a broken pairwise_masks) and returns what it found; the tests below read that job's report.
"""
import functools

import numpy as np
import pytest

from helpers import outcome
from syncml_lib.mpirun import run

RANKS = [1, 2, 3, 4, 5]
F = 16  # FRACTION_BITS
CHI2_CRITICAL = 37.70  # chi-square, 15 degrees of freedom, upper 0.1% point (standard tables)


def shapes_for(p):
    return [(), (0,), (1,), (7,), (p + 1,), (1001,), (3, 5)]


def make_input(rank, shape, scale, dtype="float64"):
    """Deterministic data that differs per rank, uniform in [-scale, scale]."""
    rng = np.random.default_rng([rank, len(shape), int(np.prod(shape)), int(scale)])
    return np.asarray(rng.uniform(-scale, scale, size=shape), dtype=dtype)


def exact_sum(comm, x, fraction_bits=F, ranks=None):
    """The sum of the rounded fixed-point values, in exact int64 arithmetic, over `ranks` (default all)."""
    from mpi4py import MPI

    ints = np.round(x.astype(np.float64) * 2.0 ** fraction_bits).astype(np.int64)
    if ranks is not None and comm.rank not in ranks:
        ints[...] = 0
    total = np.empty_like(ints)
    comm.Allreduce(ints, total, op=MPI.SUM)
    return total / 2.0 ** fraction_bits  # exact: an integer below 2^31 divided by a power of two


def float_sum(comm, x, ranks=None):
    from mpi4py import MPI

    mine = x.astype(np.float64) if ranks is None or comm.rank in ranks else np.zeros(x.shape)
    total = np.empty_like(mine)
    comm.Allreduce(mine, total, op=MPI.SUM)
    return total


def check_sum(comm, case, y, x, fraction_bits=F, ranks=None):
    """Problems with y as the secure sum of x over `ranks` (default all): a list of strings."""
    problems = []
    if not isinstance(y, np.ndarray) or y.shape != x.shape or y.dtype != np.float64:
        return [f"{case}: got {type(y).__name__} {getattr(y, 'shape', '')} {getattr(y, 'dtype', '')} "
                f"on rank {comm.rank}"]
    survivors = comm.size if ranks is None else len(ranks)
    tolerance = survivors * 2.0 ** -(fraction_bits + 1) + 1e-9  # rounding, plus the float sum's own error
    if not np.all(np.abs(y - float_sum(comm, x, ranks)) <= tolerance):
        problems.append(f"{case}: farther than {tolerance:.3g} from the float sum on rank {comm.rank}")
    if not np.array_equal(y, exact_sum(comm, x, fraction_bits, ranks)):
        problems.append(f"{case}: not bit for bit the sum of the encoded values on rank {comm.rank}")
    everyone = comm.allgather(y.tobytes())
    if any(theirs != everyone[0] for theirs in everyone):
        problems.append(f"{case}: ranks got different results")
    return problems


def compare_sums(comm):
    """secure_sum against MPI's Allreduce, for many shapes, sizes of value, dtypes and fraction bits."""
    from syncml_lib.secure_aggregation import secure_sum

    p = comm.size
    problems = []
    for fraction_bits in (F, 4, 24):
        limit = 2.0 ** (31 - fraction_bits) / p
        for scale in (1.0, 100.0, 0.999 * limit):
            if scale > limit:
                continue
            for shape in shapes_for(p):
                for dtype in ("float64", "float32"):
                    case = f"F={fraction_bits} scale={scale:g} {dtype} {shape}"
                    x = make_input(comm.rank, shape, scale, dtype)
                    before = x.copy()
                    y = secure_sum(comm, x, seed=42, fraction_bits=fraction_bits)
                    problems += check_sum(comm, case, y, x, fraction_bits)
                    if not np.array_equal(x, before):
                        problems.append(f"{case}: x was modified on rank {comm.rank}")
                    if np.shares_memory(x, y):
                        problems.append(f"{case}: the result shares memory with x on rank {comm.rank}")
    for dtype in ("int32", "int64", "uint8"):
        x = np.asarray(make_input(comm.rank, (11,), 100.0) + 100, dtype=dtype)
        problems += check_sum(comm, f"integers {dtype}", secure_sum(comm, x, seed=7), x)
    # Near the edge: every rank at the largest value that still fits (the sum is just below 2^(31-F)).
    edge = np.full(3, (np.ceil(2.0 ** 31 / p) - 1) / 2.0 ** F)
    problems += check_sum(comm, "at the edge", secure_sum(comm, edge, seed=3), edge)
    problems += check_sum(comm, "at the negative edge", secure_sum(comm, -edge, seed=3), -edge)
    return problems


def masks_cancel(comm):
    """Do the masks of all ranks add up to 0 modulo 2^32? A list of problems."""
    from mpi4py import MPI

    from syncml_lib.secure_aggregation import pairwise_masks

    problems = []
    for shape in [(), (0,), (1000,), (4, 5)]:
        mask = pairwise_masks(comm.rank, comm.size, 99, shape)
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint32 or mask.shape != shape:
            problems.append(f"{shape}: the mask is a {type(mask).__name__} {getattr(mask, 'dtype', '')} "
                            f"{getattr(mask, 'shape', '')}")
            continue
        total = np.empty_like(mask)
        comm.Allreduce(mask, total, op=MPI.SUM)  # unsigned sums wrap modulo 2^32 in MPI too
        if np.any(total != 0):
            problems.append(f"{shape}: the masks do not cancel")
    return problems


def chi_square_top_bits(values):
    """Chi-square statistic of the top 4 bits of uint32 values (16 bins) against the uniform distribution."""
    counts = np.bincount(values >> 28, minlength=16)
    expected = values.size / 16
    return float(np.sum((counts - expected) ** 2 / expected))


def masked_looks_random(comm):
    from syncml_lib.secure_aggregation import encode, masked_vector

    x = make_input(comm.rank, (10000,), 1000.0 / comm.size)
    masked, encoded = masked_vector(x, comm.rank, comm.size, 5), encode(x)
    return {"differs everywhere": bool(np.all(masked != encoded)),
            "chi2 masked": chi_square_top_bits(masked), "chi2 encoded": chi_square_top_bits(encoded)}


def dropout(comm):
    """dropped=[1] and dropped=[0, p-1] (p >= 3), with and without recovery."""
    from syncml_lib.secure_aggregation import secure_sum

    p = comm.size
    x = make_input(comm.rank, (1000,), 10.0)
    found = {}
    for dropped in ([1], [0, p - 1]):
        survivors = [r for r in range(p) if r not in dropped]
        garbage = secure_sum(comm, x, seed=11, dropped=dropped, recover=False)
        found[f"{dropped} error without recovery"] = float(np.max(np.abs(garbage - float_sum(comm, x, survivors))))
        recovered = secure_sum(comm, x, seed=11, dropped=dropped)
        found[f"{dropped} problems"] = check_sum(comm, f"dropped={dropped}", recovered, x, ranks=survivors)
    return found


def bad_inputs(comm):
    """Each bad call on every rank; returns {case: outcome on this rank}."""
    from syncml_lib.secure_aggregation import secure_sum

    p, rank, last = comm.size, comm.rank, comm.size - 1
    x = np.ones(4)
    too_big = np.full(4, 1.01 * 2.0 ** (31 - F) / p)
    cases = {
        "out of range on one rank": lambda: secure_sum(comm, too_big if rank == last else x, seed=1),
        "a list": lambda: secure_sum(comm, [1.0, 2.0], seed=1),
        "NaN on one rank": lambda: secure_sum(comm, np.array([1.0, np.nan]) if rank == last else np.ones(2), seed=1),
        "complex": lambda: secure_sum(comm, x + 1j, seed=1),
        "bool": lambda: secure_sum(comm, x > 0, seed=1),
        "seed not an int": lambda: secure_sum(comm, x, seed=1.5),
        "negative seed": lambda: secure_sum(comm, x, seed=-1),
        "fraction_bits 31": lambda: secure_sum(comm, x, seed=1, fraction_bits=31),
        "dropped rank p": lambda: secure_sum(comm, x, seed=1, dropped=[p]),
        "dropped everyone": lambda: secure_sum(comm, x, seed=1, dropped=range(p)),
        "dropped not ranks": lambda: secure_sum(comm, x, seed=1, dropped=["a"]),
    }
    if p > 1:
        cases.update({
            "shapes on one rank": lambda: secure_sum(comm, np.ones(5 if rank == last else 4), seed=1),
            "list on one rank": lambda: secure_sum(comm, [1.0] * 4 if rank == last else x, seed=1),
            "seeds": lambda: secure_sum(comm, x, seed=rank),
            "dropped lists": lambda: secure_sum(comm, x, seed=1, dropped=[0] if rank == 0 else []),
        })
    found = {case: outcome(call) for case, call in cases.items()}
    found["still works afterwards"] = check_sum(comm, "afterwards", secure_sum(comm, x, seed=1), x)
    return found


def broken_masks_are_caught(comm):
    """Replace pairwise_masks: a counting wrapper must be called, and a version where both ranks of a
    pair add the mask must make the sum wrong. Returns (calls, problems found with the broken version)."""
    import syncml_lib.secure_aggregation as sa

    original, calls = sa.pairwise_masks, []

    def counted(*args):
        calls.append(args)
        return original(*args)

    def both_add(rank, size, seed, shape):
        total = np.zeros(shape, dtype=np.uint32)
        for other in range(size):
            if other != rank:
                total += sa.pair_mask(seed, min(rank, other), max(rank, other), shape)
        return total

    x = make_input(comm.rank, (100,), 1.0)
    try:
        sa.pairwise_masks = counted
        problems = check_sum(comm, "counted", sa.secure_sum(comm, x, seed=8), x)
        sa.pairwise_masks = both_add
        return len(calls), problems, check_sum(comm, "both add", sa.secure_sum(comm, x, seed=8), x)
    finally:
        sa.pairwise_masks = original


def job(comm):
    report = {"problems": compare_sums(comm), "mask problems": masks_cancel(comm), "bad inputs": bad_inputs(comm)}
    if comm.size > 1:
        report["randomness"] = masked_looks_random(comm)
    if comm.size > 2:
        report["dropout"] = dropout(comm)
    report["replaced masks"] = broken_masks_are_caught(comm)
    return report


@functools.cache
def reports(p):
    return run(job, p, timeout=60)


@pytest.mark.parametrize("p", RANKS)
def test_the_sum_matches_mpi_allreduce_within_the_precision(p):
    problems = sorted({problem for report in reports(p) for problem in report["problems"]})
    assert not problems, f"{len(problems)} failing cases on {p} ranks:\n" + "\n".join(problems[:50])


@pytest.mark.parametrize("p", RANKS)
def test_the_masks_cancel(p):
    for report in reports(p):
        assert not report["mask problems"], report["mask problems"]


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_a_masked_vector_looks_uniform_and_the_encoded_one_does_not(p):
    for rank, report in enumerate(reports(p)):
        found = report["randomness"]
        assert found["differs everywhere"], f"rank {rank}: some masked values equal the encoded ones"
        assert found["chi2 masked"] < CHI2_CRITICAL, f"rank {rank}: masked vector not uniform: {found}"
        assert found["chi2 encoded"] > CHI2_CRITICAL, f"rank {rank}: the test cannot tell: {found}"


@pytest.mark.parametrize("p", [3, 4, 5])
def test_dropped_ranks_spoil_the_sum_unless_recovered(p):
    for rank, report in enumerate(reports(p)):
        for dropped in ([1], [0, p - 1]):
            error = report["dropout"][f"{dropped} error without recovery"]
            assert error > 1000, f"rank {rank}, dropped={dropped}: without recovery the error is only {error}"
            assert not report["dropout"][f"{dropped} problems"], report["dropout"][f"{dropped} problems"]


@pytest.mark.parametrize("p", RANKS)
def test_bad_inputs_raise_on_every_rank(p):
    last = p - 1
    limit = f"{2.0 ** (31 - F) / p:.8g}"
    expected = {  # case: (error type, texts its message must contain)
        "out of range on one rank": ("ValueError", [f"on rank {last}", f"{1.01 * 2.0 ** (31 - F) / p:.8g}", limit]),
        "a list": ("TypeError", ["numpy array", "list"]),
        "NaN on one rank": ("ValueError", [f"on rank {last}", "NaN"]),
        "complex": ("TypeError", ["complex128"]),
        "bool": ("TypeError", ["bool"]),
        "seed not an int": ("TypeError", ["seed", "1.5"]),
        "negative seed": ("ValueError", ["seed", "-1"]),
        "fraction_bits 31": ("ValueError", ["fraction_bits", "31"]),
        "dropped rank p": ("ValueError", ["dropped", f"[{p}]", f"0..{last}"]),
        "dropped everyone": ("ValueError", ["dropped", "every rank", "survive"]),
        "dropped not ranks": ("ValueError", ["dropped", "'a'"]),
    }
    if p > 1:
        others = ", ".join(map(str, range(last)))
        expected.update({
            "shapes on one rank": ("ValueError", [f"shapes differ across ranks: (4,) on rank{'s' if last > 1 else ''} "
                                                  f"{others}; (5,) on rank {last}"]),
            "list on one rank": ("ValueError", ["types differ", f"'list' on rank {last}"]),
            "seeds": ("ValueError", ["seeds differ", "0 on rank 0", f"{last} on rank {last}"]),
            "dropped lists": ("ValueError", ["dropped_ranks differ", "(0,) on rank 0"]),
        })
    for rank, report in enumerate(reports(p)):
        for case, (kind, texts) in expected.items():
            got = report["bad inputs"][case]
            assert got is not None, f"rank {rank} did not raise for {case}"
            assert got[0] == kind, f"rank {rank}, {case}: {got}"
            for text in texts:
                assert text in got[1], f"rank {rank}, {case}: {got[1]!r} does not contain {text!r}"
        assert not report["bad inputs"]["still works afterwards"], report["bad inputs"]["still works afterwards"]


@pytest.mark.parametrize("p", RANKS)
def test_secure_sum_calls_the_module_s_pairwise_masks_and_a_broken_one_is_caught(p):
    for rank, report in enumerate(reports(p)):
        calls, problems, broken_problems = report["replaced masks"]
        assert calls == 1, f"rank {rank}: the replacement pairwise_masks was called {calls} times"
        assert not problems, problems
        if p > 1:
            assert broken_problems, f"rank {rank}: masks that do not cancel went unnoticed"
