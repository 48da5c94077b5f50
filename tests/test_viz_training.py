"""Chapter 06's pictures of training runs fit a notebook's width and draw what they are given."""
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from syncml_lib.viz import plot_bytes_per_step, plot_step_times, plot_training_curves  # noqa: E402
from test_viz_rank_figures import NOTEBOOK_WIDTH, png_width  # noqa: E402


def fake_run(steps, seed):
    """A TrainResult-like run: a history row per step and an evaluation every 10 steps."""
    rng = np.random.default_rng(seed)
    history = [dict(step=t, time=0.01 * (t + 1), loss=float(2.0 / (t + 1) + rng.random()),
                    compute=float(rng.random()) * 1e-3, communication=float(rng.random()) * 1e-3) for t in range(steps)]
    evaluations = [dict(step=s, time=0.01 * s, test_accuracy=0.5 + s / 100) for s in range(10, steps + 1, 10)]
    return SimpleNamespace(history=history, evaluations=evaluations)


def test_training_curves_draw_a_line_per_run_in_each_panel_within_the_notebook_width():
    runs = {f"mechanism {i}": fake_run(40, i) for i in range(10)}
    fig = plot_training_curves(runs, window=5)
    loss_by_step, loss_by_time, accuracy_by_step, accuracy_by_time = fig.axes
    for ax in fig.axes:
        assert len(ax.get_lines()) == len(runs)
    assert [text.get_text() for text in fig.legends[0].get_texts()] == list(runs)
    first = runs["mechanism 0"]
    x, y = loss_by_step.get_lines()[0].get_data()
    losses = [row["loss"] for row in first.history]
    assert list(x) == list(range(4, 40))                          # the window ends at steps 4 .. 39
    assert np.allclose(y, [sum(losses[t - 4:t + 1]) / 5 for t in range(4, 40)])
    assert list(loss_by_time.get_lines()[0].get_xdata()) == [row["time"] for row in first.history][4:]
    assert list(accuracy_by_step.get_lines()[0].get_xdata()) == [10, 20, 30, 40]
    assert list(accuracy_by_time.get_lines()[0].get_ydata()) == [0.6, 0.7, 0.8, 0.9]
    assert png_width(fig) <= NOTEBOOK_WIDTH


def test_step_times_stack_communication_on_compute_for_every_rank():
    histories = {"sequential": [fake_run(20, 0).history]}
    histories.update({f"run\n{i}": [fake_run(20, 10 * i + r).history for r in range(4)] for i in range(9)})
    ax = plot_step_times(histories)
    bars = ax.patches
    assert len(bars) == 2 * (1 + 9 * 4)                            # compute and communication, per rank
    compute, communication = bars[-2], bars[-1]                   # the last run's rank 3
    last = histories["run\n8"][3]
    assert np.isclose(compute.get_height(), 1e3 * np.mean([row["compute"] for row in last]))
    assert np.isclose(communication.get_y(), compute.get_height())
    assert np.isclose(communication.get_height(), 1e3 * np.mean([row["communication"] for row in last]))
    assert png_width(ax.figure) <= NOTEBOOK_WIDTH


def test_bytes_per_step_draw_measured_bars_formula_ticks_and_say_what_was_not_counted():
    sent = {"ring": [115328, 115336, 115336, 115328], "ps": [230640, 76880, 76880, 76880], "mpi": [None] * 4}
    formulas = {"ring": ("2(p−1)/p·(n+8)", [115332] * 4), "ps": ("server W·n, workers n", [230640] + [76880] * 3)}
    ax = plot_bytes_per_step(sent, formulas)
    widths = [bar.get_width() for bar in ax.patches if bar.get_width() > 0]
    assert widths == [b / 1e3 for b in sent["ring"] + sent["ps"]]  # KB, one bar per counted rank
    ticks = [line.get_xdata()[0] for line in ax.get_lines() if len(line.get_xdata())]
    assert ticks == [b / 1e3 for b in formulas["ring"][1] + formulas["ps"][1]]
    names = [label.get_text() for label in ax.get_yticklabels()]
    assert names == ["ring\n2(p−1)/p·(n+8)", "ps\nserver W·n, workers n", "mpi"]      # the formula under the name
    assert any("not counted" in text.get_text() for text in ax.texts)
    assert png_width(ax.figure) <= NOTEBOOK_WIDTH
    plt.close("all")


def test_training_curves_draw_runs_equal_at_every_step_as_one_line_named_after_all_of_them():
    # chapter 06: six runs equal step by step were drawn on top of each other, only the last visible
    same = fake_run(40, 0)
    later = SimpleNamespace(history=[dict(row, time=2 * row["time"]) for row in same.history],
                            evaluations=[dict(e, time=2 * e["time"]) for e in same.evaluations])
    runs = {"reference": same, "other": fake_run(40, 1), "allreduce": later}
    fig = plot_training_curves(runs, window=5)
    loss_by_step, loss_by_time, accuracy_by_step, accuracy_by_time = fig.axes
    for ax in (loss_by_step, accuracy_by_step):                   # by step: "reference" and "allreduce" are one line
        assert len(ax.get_lines()) == 2
    for ax in (loss_by_time, accuracy_by_time):                   # by time they differ: a line each
        assert len(ax.get_lines()) == 3
    shared = [line for line in loss_by_step.get_lines() if "reference" in line.get_label()]
    assert len(shared) == 1 and "allreduce" in shared[0].get_label()
    assert [text.get_text() for text in fig.legends[0].get_texts()] == list(runs)   # every run has its colour
    named = " ".join(text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts())
    assert "reference" in named and "allreduce" in named and "other" not in named
    assert png_width(fig) <= NOTEBOOK_WIDTH
