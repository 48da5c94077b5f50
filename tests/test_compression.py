"""compression.py: each compressor's sum against MPI's Allreduce of the plain arrays, under real mpiexec on
1 to 5 ranks; the bytes it sends; error feedback; top-k at 1% in chapter 06's training, against uncompressed."""
import functools

import numpy as np
import pytest

from syncml_lib.compression import Int8, LowRank, Sign, TopK, get_compressor, top_k, topk_with_error_feedback
from syncml_lib.mpirun import run

SHAPES = {"W": (6, 5), "b": (5,)}  # n = 35 values: not a multiple of 8 (sign bits) nor of p


def rank_arrays(rank, step=0):
    rng = np.random.default_rng([rank, step])
    return {name: rng.normal(size=shape) for name, shape in SHAPES.items()}


def test_top_k_picks_the_largest_magnitudes_and_checks_k():
    v = np.array([0.1, -5.0, 3.0, 0.0, -0.2, 4.0])
    indices, values = top_k(v, 3)
    assert indices.tolist() == [1, 2, 5] and values.tolist() == [-5.0, 3.0, 4.0]
    for k in (0, 7, 2.0):
        with pytest.raises(ValueError, match="k must be an integer from 1 to the vector's length 6"):
            top_k(v, k)


def test_error_feedback_keeps_what_was_not_sent():
    rng = np.random.default_rng(0)
    update, residual = rng.normal(size=50), rng.normal(size=50)
    indices, values, new_residual = topk_with_error_feedback(update, residual, 5)
    sent = np.zeros(50)
    sent[indices] = values
    assert np.allclose(sent + new_residual, update + residual)  # nothing is lost, only delayed
    assert np.count_nonzero(sent) == 5 and np.all(new_residual[indices] == 0)
    assert np.min(np.abs(values)) >= np.max(np.abs(new_residual))


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        get_compressor("zip")
    assert isinstance(get_compressor("topk"), TopK) and get_compressor(None) is None


def sums(comm):
    """Each compressor's sum over 3 steps, against comm.Allreduce of the plain arrays; bytes sent."""
    from syncml_lib.trace import TracedComm

    p, n = comm.size, sum(int(np.prod(s)) for s in SHAPES.values())
    report = {}
    for label, compressor in [("topk all", TopK(fraction=1.0)), ("topk 20%", TopK(0.2)), ("int8", Int8()),
                              ("sign", Sign()), ("lowrank full", LowRank(rank=5)), ("lowrank 1", LowRank(rank=1))]:
        compressor.reset(rank_arrays(0))
        errors, scales, agree = [], [], True
        traced = TracedComm(comm)
        for step in range(3):
            mine = rank_arrays(comm.rank, step)
            got = compressor.sum(traced, mine)
            flat = np.concatenate([np.ravel(mine[k]) for k in SHAPES])
            exact = np.empty_like(flat)
            comm.Allreduce(flat, exact)
            flat_got = np.concatenate([np.ravel(got[k]) for k in SHAPES])
            errors.append(float(np.max(np.abs(flat_got - exact))))
            scales.append(comm.allreduce(float(np.max(np.abs(flat))), op=__import__("mpi4py").MPI.MAX))
            agree &= len(set(comm.allgather(flat_got.tobytes()))) == 1
        report[label] = dict(errors=errors, scales=scales, agree=agree, bytes=traced.bytes_sent() / 3, n=n)
    return report


@functools.cache
def sum_reports(p):
    return run(sums, p, timeout=60)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_each_compressor_sums_like_mpi_within_its_error(p):
    for rank, report in enumerate(sum_reports(p)):
        for label, r in report.items():
            assert r["agree"], f"{label}: ranks got different sums on {p} ranks"
        assert max(report["topk all"]["errors"]) < 1e-12  # k = n sends everything
        assert max(report["lowrank full"]["errors"]) < 1e-10  # rank = min(6, 5): exact
        # int8: each rank's value is off by at most half a level, max|v| / 127 / 2
        assert all(e <= p * s / 254 + 1e-12 for e, s in zip(report["int8"]["errors"], report["int8"]["scales"]))
        assert max(report["lowrank 1"]["errors"]) > 1e-3  # rank 1 of a rank-5 sum is an approximation


@pytest.mark.parametrize("p", [2, 3, 5])
def test_bytes_sent_are_the_formulas(p):
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    k = round(0.2 * n)
    expected = {"topk 20%": (p - 1) * 12 * k, "int8": (p - 1) * (n + 8), "sign": (p - 1) * ((n + 7) // 8 + 8)}
    for report in sum_reports(p):
        for label, want in expected.items():
            assert report[label]["bytes"] == want, (label, report[label]["bytes"], want)
        # low-rank r = 1: P (6 x 1) then Q (5 x 1) with b (5), each a ring allreduce: 2 (p-1)/p of 8 bytes each, up to chunking
        ring = 2 * (p - 1) / p * 8 * (6 + 5 + 5)
        assert abs(report["lowrank 1"]["bytes"] - ring) <= 2 * 8 * (p - 1)


def compressed_training(comm):
    from syncml_lib.training import train

    settings = dict(model="mlp", epochs=4, batch_size=32, lr=0.2, seed=0)
    results = {"none": train(comm, "allreduce", **settings),
               "topk 1% EF": train(comm, "allreduce", compression=TopK(0.01), **settings),
               "topk 1% no EF": train(comm, "allreduce", compression=TopK(0.01, error_feedback=False), **settings)}
    errors = {}
    for label, call in {"k too large": lambda: train(comm, "allreduce", compression=TopK(k=10**6), **settings),
                        "unknown": lambda: train(comm, "allreduce", compression="zip", **settings)}.items():
        try:
            call()
            errors[label] = None
        except ValueError as error:
            errors[label] = str(error)
    return {label: (r.test_accuracy, np.mean([row["bytes_sent"] for row in r.history]),
                    r.params["W1"].tobytes()) for label, r in results.items()}, errors


def test_topk_with_error_feedback_keeps_the_accuracy_within_2_points():
    reports = run(compressed_training, 4, timeout=120)
    (accuracy, sent, w) = reports[0][0]["topk 1% EF"]
    plain_accuracy, plain_sent, _ = reports[0][0]["none"]
    assert accuracy >= plain_accuracy - 0.02, (accuracy, plain_accuracy)
    assert sent * 30 < plain_sent  # 3,456 bytes against 115,328
    assert all(report[0]["topk 1% EF"][2] == w for report in reports)  # the replicas are identical
    for rank, (_, errors) in enumerate(reports):
        assert "k must be an integer from 1 to the vector's length, 9610" in errors["k too large"], rank
        assert "unknown compression 'zip'" in errors["unknown"], rank


def failing_compressor(comm):
    """A top-k whose answer raises on rank 1 only, at the 3rd step: every rank must stop, none wait."""
    from syncml_lib import compression
    from syncml_lib.training import train

    calls = []

    def broken(update, residual, k):
        calls.append(1)
        if comm.rank == 1 and len(calls) == 3:
            raise RuntimeError("boom")
        return topk_with_error_feedback(update, residual, k)

    compression.topk_with_error_feedback = broken
    try:
        train(comm, "allreduce", compression=TopK(0.01), model="mlp", epochs=1, batch_size=32, lr=0.2)
    except ValueError as error:
        return str(error)
    finally:  # the ranks run case after case (mpirun.reuse_jobs): leave the library as it was
        compression.topk_with_error_feedback = topk_with_error_feedback
    return None


def test_a_compressor_that_raises_on_one_rank_stops_every_rank():
    for message in run(failing_compressor, 3, timeout=60):
        assert message and "bad gradient at step 2" in message and "rank 1: TopK.compress raised RuntimeError: boom" in message
