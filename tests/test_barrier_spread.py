"""Chapter 01's barrier claim (#23): the wait at a barrier grows with the spread of the workers' step
times, not with their mean; and its figure labels every axis and fits a notebook.

References: the wait of W shifted exponentials from a seeded simulation, against (H_W - 1) * spread; the
run under real mpiexec against the same seeded draws, with a margin of 4 times the narrow draws' wait."""
import io
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from syncml_lib.barrier import BarrierSteps, delays_with_spread, expected_wait  # noqa: E402
from syncml_lib.mpirun import run  # noqa: E402

NOTEBOOK_WIDTH = 1000  # pixels, as the inline backend stores a figure (100 dpi, tight box)


def test_delays_with_spread_have_their_mean_and_spread_and_the_wait_depends_on_the_spread_alone():
    draws = {(mean, spread): delays_with_spread(np.random.default_rng(1), mean, spread, (100_000, 8))
             for mean, spread in [(10.0, 10.0), (10.0, 2.0), (30.0, 2.0)]}
    for (mean, spread), d in draws.items():
        assert abs(d.mean() - mean) < 0.01 * mean and abs(d.std() - spread) < 0.02 * spread
        assert d.min() >= mean - spread
        for workers in (2, 4, 8):
            waits = d[:, :workers].max(axis=1, keepdims=True) - d[:, :workers]
            assert abs(waits.mean() - expected_wait(workers, spread)) < 0.02 * spread, (mean, spread, workers)
    # the same seed: the same standard draws, scaled, so the waits are in the ratio of the spreads exactly
    wide, narrow, shifted = draws[(10.0, 10.0)], draws[(10.0, 2.0)], draws[(30.0, 2.0)]
    wait = lambda d: d.max(axis=1, keepdims=True) - d  # noqa: E731
    assert np.allclose(wait(wide), 5 * wait(narrow)) and np.allclose(wait(narrow), wait(shifted))


@pytest.mark.parametrize("spread", [-1.0, 10.5])
def test_a_spread_outside_zero_to_the_mean_is_a_value_error(spread):
    with pytest.raises(ValueError, match="spread"):
        delays_with_spread(np.random.default_rng(0), 10.0, spread, 5)


def spread_job(comm, mean, spreads, steps):
    from syncml_lib.barrier import delays_with_spread, run_barrier_steps

    out = {}
    for spread in spreads:
        steps_run = run_barrier_steps(comm, delays_with_spread(np.random.default_rng([0, comm.rank]), mean, spread, steps))
        out[spread] = (steps_run.waits.mean(), steps_run.floor_waits.mean())
    return out


def test_under_mpiexec_the_same_mean_with_the_wider_spread_waits_longer():
    wide, narrow = 0.008, 0.001
    result = run(spread_job, 3, 0.008, [wide, narrow], 30, timeout=60)[0]
    (wide_wait, wide_draws), (narrow_wait, narrow_draws) = result[wide], result[narrow]
    assert np.isclose(wide_draws, 8 * narrow_draws)                   # the same draws, scaled
    assert wide_wait >= wide_draws - 1e-4 and narrow_wait >= narrow_draws - 1e-4
    assert wide_wait > narrow_wait + 4 * narrow_draws, result         # 7 times the narrow draws' wait apart


def simulated(spread, workers, mean=0.010, steps=40):
    delays = np.array([delays_with_spread(np.random.default_rng([0, r]), mean, spread, steps) for r in range(workers)])
    floor = delays.max(axis=0)
    return BarrierSteps(delays, floor - delays + 1e-4, floor + 1e-4)


def test_the_barrier_figure_labels_every_axis_and_fits_a_notebook():
    from syncml_lib.viz import plot_barrier_steps

    spreads = {"wide": 0.010, "narrow": 0.002}
    fig = plot_barrier_steps({label: {w: simulated(s, w) for w in range(1, 5)} for label, s in spreads.items()}, spreads)
    assert len(fig.axes) == 3
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes), [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "panels cross each other"
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim(), "both spreads on one scale"
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    assert struct.unpack(">I", out.getvalue()[16:20])[0] <= NOTEBOOK_WIDTH
