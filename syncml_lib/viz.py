"""Pictures for the chapters (matplotlib): what each rank holds, step by step."""
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_rank_buffers"]


def plot_rank_buffers(stages, title=None, fmt="{:g}", cmap="viridis"):
    """Draw each rank's buffer at each stage: one panel per stage, one row per rank, one box per slot.

    `stages` maps a label ("before", "after Bcast", ...) to a list with one 1-D array per rank.
    Boxes are coloured by value and labelled with it; an empty slot (NaN) is left white.
    Returns the matplotlib Figure.
    """
    labels = list(stages)
    values = [np.asarray(v, dtype=float) for stage in stages.values() for v in stage]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(1)])
    lo, hi = finite.min(), finite.max()
    width = max(len(v) for v in values)
    ranks = len(next(iter(stages.values())))
    fig, axes = plt.subplots(1, len(labels), figsize=(1.0 + 0.55 * width * len(labels), 0.6 + 0.45 * ranks),
                             squeeze=False)
    colours = plt.get_cmap(cmap)
    for ax, label in zip(axes[0], labels):
        for rank, buffer in enumerate(stages[label]):
            for slot, value in enumerate(np.asarray(buffer, dtype=float)):
                filled = np.isfinite(value)
                shade = colours(0.15 + 0.7 * (value - lo) / (hi - lo or 1)) if filled else "white"
                ax.add_patch(plt.Rectangle((slot, rank), 0.95, 0.9, facecolor=shade, edgecolor="black", lw=0.6))
                if filled:
                    ax.text(slot + 0.47, rank + 0.45, fmt.format(value), ha="center", va="center", fontsize=8,
                            color="white" if (value - lo) / (hi - lo or 1) < 0.55 else "black")
        ax.set_xlim(-0.1, width)
        ax.set_ylim(ranks, -0.1)
        ax.set_yticks(np.arange(ranks) + 0.45, [f"rank {r}" for r in range(ranks)])
        ax.set_xticks([])
        ax.set_title(label, fontsize=10)
        for side in ax.spines.values():
            side.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
