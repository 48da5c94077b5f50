"""The pictures of chapters 00 and 03 fit a notebook's width, and message diagrams put one exchange in one column."""
import io
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from syncml_lib.viz import message_rounds, plot_messages, plot_rank_buffers  # noqa: E402

NOTEBOOK_WIDTH = 1000  # pixels, as the notebook stores the figure (inline backend: 100 dpi, tight box)


def png_width(fig):
    """The width in pixels of the PNG that Jupyter's inline backend would store for fig."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return struct.unpack(">I", out.getvalue()[16:20])[0]


def send(rank, step, dest):
    return dict(rank=rank, step=step, kind="send", source=rank, dest=dest, bytes=8)


def recv(rank, step, source):
    return dict(rank=rank, step=step, kind="recv", source=source, dest=rank, bytes=8)


def rounds_of(records):
    return [(r["source"], r["dest"], rnd) for rnd, r in message_rounds(records)]


@pytest.mark.parametrize("n_stages, slots", [(4, 8), (7, 8), (3, 20)])
def test_rank_buffers_wrap_into_rows_that_fit_a_notebook(n_stages, slots):
    # chapter 00: 4 stages of 8 slots; chapter 03: the ring's 7 stages of 8 slots
    stages = {f"stage {i}": [np.arange(slots, dtype=float) + r for r in range(4)] for i in range(n_stages)}
    fig = plot_rank_buffers(stages, title="a title")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == list(stages), "every stage drawn once, in order"
    assert png_width(fig) <= NOTEBOOK_WIDTH


def test_rank_buffers_keep_one_row_per_rank_and_a_box_per_slot():
    stages = {"before": [np.array([1.0, np.nan]), np.array([np.nan, 2.0]), np.array([3.0, 4.0])]}
    fig = plot_rank_buffers(stages)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]
    assert len(ax.patches) == 6 and sorted(t.get_text() for t in ax.texts) == ["1", "2", "3", "4"]
    plt.close(fig)


def test_a_message_sits_in_the_round_where_both_ends_are_free():
    # naive allreduce on 3 ranks: rank 0 receives from 1, then from 2, then sends back to 1, then to 2
    records = [recv(0, 0, 1), recv(0, 1, 2), send(0, 2, 1), send(0, 3, 2),
               send(1, 0, 0), recv(1, 1, 0),
               send(2, 0, 0), recv(2, 1, 0)]
    assert sorted(rounds_of(records), key=lambda m: m[2]) == [(1, 0, 0), (2, 0, 1), (0, 1, 2), (0, 2, 3)]


def test_a_sendrecv_exchange_is_one_round():
    # a ring of 3 ranks, 2 steps of Sendrecv: every message of step s is in round s
    records = []
    for rank in range(3):
        for step in range(2):
            records += [send(rank, step, (rank + 1) % 3), recv(rank, step, (rank - 1) % 3)]
    assert sorted(rounds_of(records)) == sorted((r, (r + 1) % 3, s) for r in range(3) for s in range(2))


def test_message_diagram_draws_rounds_and_its_labels_do_not_overlap():
    naive = [recv(0, 0, 1), recv(0, 1, 2), send(0, 2, 1), send(0, 3, 2),
             send(1, 0, 0), recv(1, 1, 0), send(2, 0, 0), recv(2, 1, 0)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax in axes:
        plot_messages(naive, 3, title="naive: 4 messages", ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    ax = axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"], "one column per round"
    starts = sorted(round(a.xyann[0]) for a in ax.texts if hasattr(a, "xyann"))
    assert starts == [0, 1, 2, 3], "each message drawn in its own round"
    renderer = fig.canvas.get_renderer()
    labels = [ax.xaxis.label.get_window_extent(renderer) for ax in axes]
    assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])
    assert png_width(fig) <= NOTEBOOK_WIDTH


# ----------------------------------------------------------------------------- as committed

def stored_cells(name):
    import nbformat

    from helpers import ROOT

    return nbformat.read(ROOT / "notebooks" / name, as_version=4).cells


def stored_png_widths(name):
    import base64

    return [struct.unpack(">I", base64.b64decode(out["data"]["image/png"])[16:20])[0]
            for cell in stored_cells(name) if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]


@pytest.mark.parametrize("name", ["00_setup_and_tour.ipynb", "03_allreduce.ipynb"])
def test_stored_figures_fit_a_notebook(name):
    widths = stored_png_widths(name)
    assert widths and max(widths) <= NOTEBOOK_WIDTH, widths


def test_chapter_00_shows_what_every_rank_printed():
    first = next(c for c in stored_cells("00_setup_and_tour.ipynb") if c.source.startswith("%%px") and "print" in c.source)
    shown = "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in first.outputs)
    assert all(f"I am rank {r} of 4" in shown for r in range(4)), shown
