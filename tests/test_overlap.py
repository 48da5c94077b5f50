"""training/overlap.py: the simulated backward pass with bucketed Iallreduces, under real mpiexec.

Its result is checked against plain MPI: every layer's sum over the ranks equals comm.Allreduce of
that layer (gradients of whole numbers, so that any order of summation gives the same bits). Timing
is not asserted here (chapter 06 measures it); the cost bound best_overlap is checked by hand.
"""
import numpy as np
import pytest

from syncml_lib.mpirun import run
from syncml_lib.training.overlap import MODES, best_overlap, progress_thread_env


def every_mode(comm, layer_sizes, bucket_bytes):
    """For each (device, mode): the largest |reduced - Allreduce| over the layers; and the buckets."""
    from mpi4py import MPI

    from syncml_lib.training.overlap import simulated_backward

    rng = np.random.default_rng(comm.rank)
    grads = [rng.integers(-1000, 1000, size=size).astype(np.float64) for size in layer_sizes]
    grads[1] = grads[1].reshape(-1, 2)                            # shapes come back as they were
    expected = []
    for grad in grads:
        total = np.empty_like(grad)
        comm.Allreduce(grad, total, op=MPI.SUM)
        expected.append(total)
    errors = {}
    for device in ("sleep", "cpu"):
        for mode in MODES:
            result = simulated_backward(comm, grads, [2, 1, 3, 1], mode, bucket_bytes, device, slice_seconds=1e-3)
            assert [r.shape for r in result["reduced"]] == [g.shape for g in grads]
            assert result["step"] == pytest.approx(result["compute"] + result["communication"])
            assert result["compute"] >= 7e-3 or device == "cpu"     # the device's 7 slices of 1 ms
            errors[device, mode] = max(float(np.max(np.abs(r - e))) for r, e in zip(result["reduced"], expected))
    return errors


@pytest.mark.parametrize("n, bucket_bytes", [(2, 0), (3, 8 * 3000), (4, None), (5, 0)])
def test_every_mode_and_device_reduces_like_allreduce(n, bucket_bytes):
    # 4 layers of unequal sizes, a big one (300,000 floats: MPICH's large-message algorithms) among them
    everyone = run(every_mode, n, [1000, 2000, 300_000, 10], bucket_bytes, timeout=120)
    for rank, errors in enumerate(everyone):
        assert set(errors) == {(d, m) for d in ("sleep", "cpu") for m in MODES}
        for key, error in errors.items():
            assert error == 0.0, (rank, key, error)


def bad_calls(comm):
    from syncml_lib.training.overlap import simulated_backward

    said = []
    for kwargs in (dict(mode="later"), dict(mode="poll", device="gpu"), dict(mode="poll", layer_slices=[1])):
        arguments = dict(dict(layer_slices=[1, 1]), **kwargs)
        try:
            simulated_backward(comm, [np.ones(3), np.ones(2)], **arguments)
        except ValueError as error:
            said.append(str(error))
    return said


def test_bad_mode_device_or_layer_count_is_a_clear_error_on_every_rank():
    for said in run(bad_calls, 2, timeout=60):
        assert len(said) == 3
        assert "mode must be one of none, wait, poll, got 'later'" in said[0]
        assert "device must be one of sleep, cpu, got 'gpu'" in said[1]
        assert "2 gradients but 1 layer_slices" in said[2]


def progress_state(comm):
    from syncml_lib.training.overlap import progress_thread_on

    return progress_thread_on()


def test_the_progress_thread_is_on_only_in_jobs_started_inside_progress_thread_env(monkeypatch):
    monkeypatch.delenv("MPIR_CVAR_ASYNC_PROGRESS", raising=False)
    assert run(progress_state, 2, timeout=60) == [False, False]
    with progress_thread_env():
        assert run(progress_state, 2, timeout=60) == [True, True]
    assert run(progress_state, 2, timeout=60) == [False, False]   # put back as it was


def test_best_overlap_is_compute_plus_what_the_last_buckets_leave():
    # 4 equal layers, 1 s of compute and 1 s of reduction each: bucket i is ready at i + 1 s and, one
    # at a time, ends at i + 2 s; the last ends 1 s after the backward pass (4 s): 5 s, not 8 s
    assert best_overlap(4.0, 4.0, [8] * 4, [1] * 4) == pytest.approx(5.0)
    # one bucket for everything: nothing starts before the backward pass ends
    assert best_overlap(4.0, 4.0, [8] * 4, [1] * 4, bucket_bytes=None) == pytest.approx(8.0)
    # a short reduction behind a long backward pass: only the last layer's bucket is left over
    assert best_overlap(10.0, 1.0, [8] * 4, [1] * 4) == pytest.approx(10.25)
    for compute, communication in ((1.0, 3.0), (3.0, 1.0)):
        assert best_overlap(compute, communication, [8, 16, 8], [1, 2, 1]) >= max(compute, communication)
