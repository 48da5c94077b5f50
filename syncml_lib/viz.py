"""Pictures for the chapters (matplotlib): what each rank holds, step by step."""
import matplotlib.pyplot as plt
import numpy as np

from .clocks import matched_messages

__all__ = ["plot_rank_buffers", "message_rounds", "plot_messages", "plot_timeline", "plot_parameter_server",
           "plot_worker_steps", "plot_owners", "plot_hash_ring", "plot_task_timeline", "plot_training_curves",
           "plot_step_times", "plot_bytes_per_step", "plot_space_time",
           "plot_lamport", "plot_barrier_steps"]


def plot_rank_buffers(stages, title=None, fmt="{:g}", cmap="viridis", columns=None, max_width=9.5):
    """Draw each rank's buffer at each stage: one panel per stage, one row per rank, one box per slot.

    `stages` maps a label ("before", "after Bcast", ...) to a list with one 1-D array per rank.
    Boxes are coloured by value and labelled with it; an empty slot (NaN) is left white.
    The panels wrap into rows of `columns` panels (default: as many as fit), and the figure is at
    most `max_width` inches wide (950 pixels in a notebook). Returns the matplotlib Figure.
    """
    labels = list(stages)
    values = [np.asarray(v, dtype=float) for stage in stages.values() for v in stage]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(1)])
    lo, hi = finite.min(), finite.max()
    width = max(len(v) for v in values)
    ranks = len(next(iter(stages.values())))
    box, labels_room = 0.42, 0.8  # inches: one slot; the "rank r" labels left of the first column
    if columns is None:
        columns = max(1, int((max_width - labels_room) // (box * (width + 0.6))))
    columns = min(columns, len(labels))
    rows = -(-len(labels) // columns)
    box = min(box, (max_width - labels_room) / (columns * (width + 0.6)))  # shrink to fit max_width
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(labels_room + columns * box * (width + 0.6), rows * (0.45 + box * (ranks + 0.3))))
    colours = plt.get_cmap(cmap)
    fontsize = 8 if box >= 0.3 else 6.5
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for i, (ax, label) in enumerate(zip(axes.flat, labels)):
        for rank, buffer in enumerate(stages[label]):
            for slot, value in enumerate(np.asarray(buffer, dtype=float)):
                filled = np.isfinite(value)
                shade = colours(0.15 + 0.7 * (value - lo) / (hi - lo or 1)) if filled else "white"
                ax.add_patch(plt.Rectangle((slot, rank), 0.95, 0.9, facecolor=shade, edgecolor="black", lw=0.6))
                if filled:
                    ax.text(slot + 0.47, rank + 0.45, fmt.format(value), ha="center", va="center", fontsize=fontsize,
                            color="white" if (value - lo) / (hi - lo or 1) < 0.55 else "black")
        ax.set_xlim(-0.1, width)
        ax.set_ylim(ranks, -0.1)
        first_column = i % columns == 0
        ax.set_yticks(np.arange(ranks) + 0.45, [f"rank {r}" for r in range(ranks)] if first_column else [])
        ax.tick_params(left=first_column)
        ax.set_xticks([])
        ax.set_title(label, fontsize=9)
        for side in ax.spines.values():
            side.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def message_rounds(records):
    """[(round, send record)] for the messages in trace records (trace.gather_trace), in logical rounds.

    A rank's calls happen one after the other, and a message is in the same round at both ends: a
    round is one column of a message diagram, so an exchange (a Sendrecv pair) takes one round, and
    rank 0 receiving from ranks 1, 2, 3 in turn takes three. The k-th message from a to b is
    received by b's k-th receive from a (MPI keeps the order between two ranks); each call gets the
    smallest round that keeps both rules.
    """
    calls = {(r["rank"], r["step"]) for r in records}
    sends = sorted((r for r in records if r["kind"] == "send"), key=lambda r: r["step"])
    recvs = sorted((r for r in records if r["kind"] == "recv"), key=lambda r: r["step"])
    received = {}  # (source, dest) -> the receiving calls, in order
    for r in recvs:
        received.setdefault((r["source"], r["dest"]), []).append((r["rank"], r["step"]))
    pairs, sent_so_far = [], {}
    for r in sends:
        k = sent_so_far[r["source"], r["dest"]] = sent_so_far.get((r["source"], r["dest"]), -1) + 1
        at = received.get((r["source"], r["dest"]), [])
        pairs.append((r, (r["rank"], r["step"]), at[k] if k < len(at) else None))
    round_of = dict.fromkeys(calls, 0)
    for _ in range(len(calls) + 1):  # push rounds forward until both rules hold (a longest path)
        before = dict(round_of)
        for rank, step in calls:
            if (rank, step - 1) in round_of:
                round_of[rank, step] = max(round_of[rank, step], round_of[rank, step - 1] + 1)
        for _, sender, receiver in pairs:
            if receiver is not None:
                round_of[sender] = round_of[receiver] = max(round_of[sender], round_of[receiver])
        if round_of == before:
            break
    return [(round_of[sender], r) for r, sender, _ in pairs]


def plot_messages(records, size, title=None, ax=None):
    """Who sends to whom in each round (message_rounds): one column per round, an arrow per message."""
    rounds = message_rounds(records)
    columns = 1 + max((rnd for rnd, _ in rounds), default=0)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.8 * columns, 0.5 + 0.5 * size))
    for rnd, r in rounds:
        ax.annotate("", xy=(rnd + 0.85, r["dest"]), xytext=(rnd + 0.15, r["source"]),
                    arrowprops=dict(arrowstyle="->", color=plt.get_cmap("tab10")(r["source"] % 10), lw=1.4))
    ax.set_xlim(0, columns)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_yticks(range(size), [f"rank {k}" for k in range(size)])
    ax.set_xticks(np.arange(columns) + 0.5, [str(c) for c in range(columns)])
    for c in range(1, columns):
        ax.axvline(c, color="0.85", lw=0.8)
    ax.set_xlabel("round")
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_timeline(records, size, title=None, ax=None):
    """A per-rank timeline of messages (start to end of each send), coloured by step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.6 + 0.45 * size))
    colours = plt.get_cmap("tab20")
    for r in records:
        if r["kind"] == "send" and r["end"] is not None:
            ax.barh(r["rank"], 1e3 * (r["end"] - r["start"]), left=1e3 * r["start"], height=0.6,
                    color=colours(r["step"] % 20), edgecolor="black", lw=0.3)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_yticks(range(size), [f"rank {k}" for k in range(size)])
    ax.set_xlabel("milliseconds (one bar per message, colour = step)")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def _message_arrows(ax, records, x, alpha, shrink):
    """An arrow per message of trace records, from its send to its receive at x(record), coloured by sender."""
    colours = plt.get_cmap("tab10")
    for send, receive in matched_messages(records):
        s, r = records[send], records[receive]
        ax.annotate("", xy=(x(r), r["rank"]), xytext=(x(s), s["rank"]),
                    arrowprops=dict(arrowstyle="->", color=colours(s["rank"] % 10), lw=0.7, alpha=alpha,
                                    shrinkA=shrink, shrinkB=shrink))


def plot_space_time(run, title=None, ax=None):
    """A space-time diagram of a consistency.ClockedRun: one line per rank, a box per iteration (its
    number inside), gray where the rank waited, an arrow per clock message from its send to the moment
    its receiver took it in."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.7 + 0.55 * len({row["rank"] for row in run.iterations})))
    ranks = sorted({row["rank"] for row in run.iterations})
    colours = plt.get_cmap("tab10")
    for rank in ranks:
        previous_end = 0.0
        for row in run.of_rank(rank):
            if row["start"] > previous_end:
                ax.barh(rank, 1e3 * (row["start"] - previous_end), left=1e3 * previous_end, height=0.5, color="0.85")
            ax.barh(rank, 1e3 * (row["end"] - row["start"]), left=1e3 * row["start"], height=0.5,
                    color=colours(rank % 10), edgecolor="white", lw=0.5)
            ax.text(1e3 * (row["start"] + row["end"]) / 2, rank, str(row["iteration"]), ha="center", va="center",
                    fontsize=7, color="white")
            previous_end = row["end"]
    _message_arrows(ax, run.messages, lambda record: 1e3 * (record["start"] if record["kind"] == "send" else record["end"]),
                    alpha=0.6, shrink=0)
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.4, -0.6)
    ax.set_xlabel("milliseconds (a box: one iteration; gray: waiting; an arrow: a clock message)")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_lamport(stamped, title=None, ax=None):
    """The events of Lamport-stamped trace records (clocks.lamport_clocks) in logical time: a dot per
    event at x = its clock (filled: send, open: receive), an arrow per message from its send to its
    receive. Every arrow points to the right: a receive's clock is greater than its send's."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.7 + 0.55 * len({r["rank"] for r in stamped})))
    colours = plt.get_cmap("tab10")
    ranks = sorted({r["rank"] for r in stamped})
    for rank in ranks:
        ax.axhline(rank, color="0.85", lw=0.8, zorder=0)
    for r in stamped:
        ax.plot(r["lamport"], r["rank"], "o", ms=4.5, color=colours(r["rank"] % 10),
                mfc=colours(r["rank"] % 10) if r["kind"] == "send" else "white")
    _message_arrows(ax, stamped, lambda record: record["lamport"], alpha=0.7, shrink=3)
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlabel("Lamport clock (filled: a send, open: a receive)")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_parameter_server(n_servers, n_workers, ax=None):
    """The parameter-server architecture: servers (each with a slice of every parameter) above, workers below."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    width = max(n_servers, n_workers)
    centred = lambda count: (width - 1) / 2 + np.arange(count) - (count - 1) / 2  # noqa: E731  (one apart)
    server_x, worker_x = centred(n_servers), centred(n_workers)
    for s, x in enumerate(server_x):
        ax.add_patch(plt.Rectangle((x - 0.42, 1.6), 0.84, 0.65, facecolor="tab:orange", alpha=0.8))
        ax.text(x, 1.92, f"server {s}\n(rank {s})\nslice {s} of w", ha="center", va="center", fontsize=7.5)
    for w, x in enumerate(worker_x):
        ax.add_patch(plt.Rectangle((x - 0.42, -0.15), 0.84, 0.65, facecolor="tab:blue", alpha=0.8))
        ax.text(x, 0.17, f"worker {w}\n(rank {n_servers + w})\ndata part {w}", ha="center", va="center",
                fontsize=7.5, color="white")
        for sx in server_x:
            ax.annotate("", xy=(x - 0.08, 0.5), xytext=(sx - 0.08, 1.6), arrowprops=dict(arrowstyle="->", color="tab:green"))
            ax.annotate("", xy=(sx + 0.08, 1.6), xytext=(x + 0.08, 0.5), arrowprops=dict(arrowstyle="->", color="tab:red"))
    ax.text(width - 0.4, 1.05, "pull w (green)\npush gradient (red)", fontsize=8, ha="left", va="center")
    ax.set_xlim(-0.6, width + 1.2)
    ax.set_ylim(-0.25, 2.35)
    ax.axis("off")
    return ax


def plot_worker_steps(history, title=None, ax=None):
    """Each worker's steps on a time line: waiting for its pull (light) and computing + pushing (dark)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 2))
    workers = sorted({row["worker"] for row in history})
    for row in history:
        y = row["worker"]
        ax.barh(y, 1e3 * (row["pulled"] - row["start"]), left=1e3 * row["start"], color="lightgray", height=0.6)
        ax.barh(y, 1e3 * (row["end"] - row["pulled"]), left=1e3 * row["pulled"], height=0.6,
                color=plt.get_cmap("tab10")(row["worker"] % 10), edgecolor="white", lw=0.3)
    ax.set_yticks(workers, [f"worker {w}" for w in workers])
    ax.set_ylim(len(workers) - 0.5, -0.5)
    ax.set_xlabel("milliseconds (gray: waiting for the pull; colour: one step)")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_owners(layouts, size, ax=None):
    """One row per layout, one box per item, coloured by the rank that holds it (white: no rank;
    hatched: more than one). `layouts` maps a name to a list with one list of ranks per item."""
    ax = ax or plt.gca()
    colours = plt.get_cmap("tab10")
    for row, (name, owners) in enumerate(layouts.items()):
        for item, ranks in enumerate(owners):
            shade = colours(ranks[0] % 10) if len(ranks) == 1 else "white"
            ax.add_patch(plt.Rectangle((item, row), 0.95, 0.85, facecolor=shade, edgecolor="black", lw=0.5,
                                       hatch="///" if len(ranks) > 1 else None))
            if len(ranks) == 1:
                ax.text(item + 0.47, row + 0.42, str(ranks[0]), ha="center", va="center", fontsize=7, color="white")
    n = max(len(owners) for owners in layouts.values())
    ax.set_xlim(-0.1, n)
    ax.set_xticks(np.arange(0, n, 5) + 0.47, [str(i) for i in range(0, n, 5)])
    ax.set_ylim(len(layouts), -0.1)
    ax.set_yticks(np.arange(len(layouts)) + 0.42, list(layouts))
    ax.set_xlabel(f"item (box: the rank of {size} that holds it; white: none; hatched: several)")
    for side in ax.spines.values():
        side.set_visible(False)
    return ax


def plot_hash_ring(ring, keys=(), replicas=1, ax=None):
    """The ring of a kvstore.HashRing, position 0 at the top and growing clockwise: each server's points
    (coloured by server), and each key as a black tick at its position, labelled with its owners (the
    next distinct servers clockwise)."""
    from .data import stable_hash

    ax = ax or plt.gca()
    colours = plt.get_cmap("tab10")
    angle = lambda position: np.pi / 2 - 2 * np.pi * position / 2.0**64  # noqa: E731  (0 at the top, clockwise)
    circle = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(circle), np.sin(circle), color="0.8", lw=1)
    for position, server in ring.points:
        a = angle(position)
        ax.plot(np.cos(a), np.sin(a), "o", ms=6, color=colours(server % 10))
    for key in keys:
        a = angle(stable_hash(key))
        owners = ring.owners(key, replicas)
        ax.plot([0.85 * np.cos(a), 1.0 * np.cos(a)], [0.85 * np.sin(a), 1.0 * np.sin(a)], color="black", lw=1)
        ax.text(0.72 * np.cos(a), 0.72 * np.sin(a), f"{key}\n→ {owners}", fontsize=7, ha="center", va="center")
    for server in ring.servers:
        ax.plot([], [], "o", color=colours(server % 10), label=f"server {server}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_aspect("equal")
    ax.axis("off")
    return ax


def plot_task_timeline(trace, n_workers, title=None, ax=None, reassigned=()):
    """One row per worker, one bar per task it ran (from scheduler.TaskResult.trace), coloured by task
    number; tasks in `reassigned` (handed out again after a lease expired) are outlined in red."""
    ax = ax or plt.gca()
    colours = plt.get_cmap("viridis")
    n_tasks = max((row["task"] for row in trace), default=0) + 1
    again = set(reassigned)
    for row in trace:
        ax.barh(row["worker"], 1000 * (row["end"] - row["start"]), left=1000 * row["start"], height=0.7,
                color=colours(row["task"] / max(n_tasks - 1, 1)), edgecolor="red" if row["task"] in again else "white",
                linewidth=1.5 if row["task"] in again else 0.5)
    ax.set_yticks(range(n_workers), [f"worker {w}" for w in range(n_workers)])
    ax.set_ylim(n_workers - 0.5, -0.5)
    ax.set_xlabel("milliseconds (a bar: one task, coloured by its number)")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


# ----------------------------------------------------------------------------- chapter 06: training runs

def _equal_by_step(a, b, same):
    """Two runs with the same steps, losses and test accuracies (within `same`)."""
    def curve(run):
        return ([row["step"] for row in run.history], [e["step"] for e in run.evaluations],
                np.array([row["loss"] for row in run.history]), np.array([e["test_accuracy"] for e in run.evaluations]))
    (steps_a, evals_a, loss_a, acc_a), (steps_b, evals_b, loss_b, acc_b) = curve(a), curve(b)
    return (steps_a == steps_b and evals_a == evals_b and np.allclose(loss_a, loss_b, rtol=0, atol=same)
            and np.allclose(acc_a, acc_b, rtol=0, atol=same))


def _wrap_labels(labels, width):
    """The labels joined by ", " in lines of at most `width` characters, never breaking a label."""
    lines = [labels[0]]
    for label in labels[1:]:
        if len(lines[-1]) + 2 + len(label) <= width:
            lines[-1] += ", " + label
        else:
            lines[-1] += ","
            lines.append(label)
    return "\n".join(lines)


def plot_training_curves(runs, window=10, same=1e-9):
    """Loss and test accuracy of training runs against the step (left) and against wall time (right),
    in one figure 9.5 inches wide. runs: label -> a training.TrainResult (or anything with its history
    and evaluations). The loss drawn is the mean over the last `window` steps (one step's loss is one
    batch's: noisy); the test accuracy is measured after each epoch. Against time, one line per run,
    in the run's colour (the figure's legend). Against the step, runs whose losses and accuracies agree
    within `same` at every step are one line, black and named after all of them (the axes' own
    legend), under the others: drawn one by one, only the last would be seen. Returns the Figure."""
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 5.8), sharey="row")
    groups = []                                                    # labels of the runs equal step by step
    for label, run in runs.items():
        group = next((g for g in groups if _equal_by_step(runs[g[0]], run, same)), None)
        if group is None:
            groups.append([label])
        else:
            group.append(label)
    colour = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(runs)}

    def draw(run, column, x, **style):
        style.setdefault("lw", 2.6 if style["color"] == "black" else 1.2)
        loss = np.array([row["loss"] for row in run.history])
        mean = np.convolve(loss, np.ones(window) / window, mode="valid")  # steps window-1 .. last
        axes[0, column].plot([row[x] for row in run.history][window - 1:], mean, **style)
        axes[1, column].plot([e[x] for e in run.evaluations], [e["test_accuracy"] for e in run.evaluations], "o-",
                             ms=3, **style)

    for label, run in runs.items():
        draw(run, 1, "time", color=colour[label], label=label)
    for group in groups:  # a shared line goes under the others, wider: the runs near it stay visible
        if len(group) == 1:
            draw(runs[group[0]], 0, "step", color=colour[group[0]], label=group[0], zorder=3)
        else:
            draw(runs[group[0]], 0, "step", color="black", label=f"{len(group)} runs, equal at every step:\n"
                 + _wrap_labels(group, 48), zorder=2, alpha=0.75)
    shared = [(line, line.get_label()) for line in axes[0, 0].get_lines() if line.get_color() == "black"]
    if shared:
        axes[0, 0].legend(*zip(*shared), fontsize=7, loc="upper right", frameon=False)
    axes[0, 0].set_ylabel(f"loss (mean of {window} steps)")
    axes[1, 0].set_ylabel("test accuracy")
    axes[1, 0].set_xlabel("step")
    axes[1, 1].set_xlabel("wall time (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].set_yscale("log")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(*axes[0, 1].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    return fig


def plot_step_times(histories, ax=None):
    """Mean milliseconds per step on each rank, split into compute (dark) and communication (light):
    a group of bars per run, one bar per rank. histories: label -> one history per rank (rows with
    compute and communication seconds, as training.TrainResult.history). Returns the Axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9.5, 3.4))
    positions, names, start = [], [], 0
    for label, ranks in histories.items():
        for rank, history in enumerate(ranks):
            compute = 1e3 * np.mean([row["compute"] for row in history])
            communication = 1e3 * np.mean([row["communication"] for row in history])
            ax.bar(start + rank, compute, color="tab:blue", width=0.8)
            ax.bar(start + rank, communication, bottom=compute, color="tab:orange", width=0.8)
            positions.append(start + rank)
            names.append(str(rank))
        ax.text(start + (len(ranks) - 1) / 2, -0.12, label, transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=7.5)
        start += len(ranks) + 1
    ax.set_xticks(positions, names, fontsize=7)
    ax.set_xlim(-0.8, start - 1.2)
    ax.set_ylabel("ms per step (bars: ranks)")
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=colour) for colour in ("tab:blue", "tab:orange")],
              ["compute", "communication (incl. waiting)"], fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return ax


def plot_bytes_per_step(sent, formulas, ax=None):
    """Bytes each rank sends per step: a group of bars per run, one bar per rank (measured), a black
    tick at what the formula predicts for that rank, and the formula under the group's name.
    sent: label -> one number per rank (None: not counted, e.g. MPI's own collectives).
    formulas: label -> (the formula as text, one predicted number per rank, or None). Returns the Axes."""
    slots = sum(len(per_rank) + 1 for per_rank in sent.values())
    if ax is None:
        _, ax = plt.subplots(figsize=(9.5, 0.14 * slots + 0.9))
    colours = plt.get_cmap("tab10")
    centres, names, y = [], [], 0
    for label, per_rank in sent.items():
        text, predicted = formulas.get(label, ("", None))
        for rank, value in enumerate(per_rank):
            if value is not None:
                ax.barh(y + rank, value / 1e3, height=0.8, color=colours(rank % 10))
            if predicted is not None:
                ax.plot(predicted[rank] / 1e3, y + rank, "k|", ms=8, mew=2)
        if all(value is None for value in per_rank):
            ax.text(0, y + (len(per_rank) - 1) / 2, "  not counted (MPI's own collective)", va="center", fontsize=8)
        centres.append(y + (len(per_rank) - 1) / 2)
        names.append(f"{label}\n{text}" if text else label)
        y += len(per_rank) + 1
    ranks = max(len(per_rank) for per_rank in sent.values())
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(rank % 10)) for rank in range(ranks)]
    handles.append(plt.Line2D([], [], color="black", marker="|", ls="", ms=8, mew=2))
    ax.legend(handles, [f"rank {rank}" for rank in range(ranks)] + ["formula"], fontsize=8, loc="lower right")
    ax.set_yticks(centres, names, fontsize=8)
    ax.set_ylim(y - 1, -1)
    ax.set_xlabel("KB sent per step (1 KB = 1000 bytes)")
    ax.grid(axis="x", alpha=0.3)
    return ax


# ----------------------------------------------------------------------------- chapter 05b: engines and graphs

def plot_engine_timeline(records, title=None, ax=None, names=False):
    """One row per engine, one bar per attempt (from EngineScheduler.records): done in blue, raised in
    orange, an attempt whose engine died in red, ending where the death was noticed; a retry that
    succeeded in green. A bar is at least 0.5 % of the time axis wide, so that an attempt of a few
    microseconds still shows. names=True writes each task's name in its bar, or, where it does not fit,
    in black above the bar (below it when that would cross the name before it on the row)."""
    ax = ax or plt.gca()
    engines = sorted({row["engine"] for row in records})
    colour = {"done": "tab:blue", "raised": "tab:orange", "engine died": "tab:red"}
    first = 1000 * min((row["start"] for row in records), default=0.0)
    last = 1000 * max((row["end"] for row in records), default=1.0)
    shortest = 0.005 * max(last - first, 1e-9)
    bars = []
    for row in records:
        y = engines.index(row["engine"])
        start, width = 1000 * row["start"], max(1000 * (row["end"] - row["start"]), shortest)
        retried = row["outcome"] == "done" and row["attempt"] > 1
        ax.barh(y, width, left=start, height=0.6, color="tab:green" if retried else colour[row["outcome"]],
                edgecolor="white", linewidth=0.5)
        bars.append((y, start, width, row["task"]))
        if row["outcome"] == "engine died":
            ax.text(start + width, y, f" {row['task']} killed engine {row['engine']}", va="center", fontsize=7)
    ax.set_xmargin(0.05)  # room for a name written beside the last bar; shared x axes keep their union
    ax.autoscale_view()
    if names:
        _name_bars(ax, bars)
    return _rows(ax, [f"engine {e}" for e in engines], title,
                 "milliseconds (blue: done, green: done on a retry, orange: raised, red: the engine died)")


def _name_bars(ax, bars):
    """Each bar's name inside it if it fits, else above it (below, if above would cross the previous
    name placed outside on the same row). bars: (row, start, width, name)."""
    renderer = ax.figure.canvas.get_renderer()
    to_pixels = ax.transData.transform
    outside = {}  # row -> the right edge (pixels) and side of the last name written outside a bar there
    for y, start, width, name in sorted(bars, key=lambda bar: (bar[0], bar[1])):
        label = ax.text(start + width / 2, y, name, ha="center", va="center", fontsize=7, color="white")
        box = label.get_window_extent(renderer)
        if box.width <= 0.92 * (to_pixels((start + width, y))[0] - to_pixels((start, y))[0]):
            continue
        right, side = outside.get(y, (-np.inf, "below"))
        side = "below" if side == "above" and box.x0 < right + 2 else "above"
        label.set(color="black", fontsize=6.5, y=y - 0.32 if side == "above" else y + 0.32,
                  va="bottom" if side == "above" else "top")  # the rows run downwards: y - 0.32 is above
        outside[y] = (label.get_window_extent(renderer).x1, side)


def _rows(ax, labels, title, xlabel, margin=0.5):
    """Finish a picture with one row per label, the first at the top."""
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 1 + margin, -margin)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_task_graph(depends_on, ax=None, title=None):
    """A task graph drawn in layers: a task sits one layer right of its deepest dependency; arrows go from
    a dependency to the task that waits for it. depends_on: task name -> list of names."""
    ax = ax or plt.gca()
    layer = {}

    def depth(name):
        if name not in layer:
            layer[name] = 1 + max((depth(d) for d in depends_on[name]), default=-1)
        return layer[name]
    for name in depends_on:
        depth(name)
    rows = {}
    position = {}
    for name in depends_on:
        position[name] = (layer[name], rows.setdefault(layer[name], 0))
        rows[layer[name]] += 1
    for name, deps in depends_on.items():
        for d in deps:
            (x0, y0), (x1, y1) = position[d], position[name]
            ax.annotate("", xy=(x1, -y1), xytext=(x0, -y0),
                        arrowprops=dict(arrowstyle="->", color="grey", lw=0.8, shrinkA=12, shrinkB=12))
    for name, (x, y) in position.items():
        ax.text(x, -y, name, ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", facecolor="white", edgecolor="tab:blue"))
    ax.set_xlim(-0.6, max(layer.values()) + 0.6)
    ax.set_ylim(-max(rows.values()) + 0.4, 0.6)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_barrier_steps(runs, spreads, shown=12, max_workers=64):
    """Chapter 01's barrier figure. runs: {label: {W: barrier.BarrierSteps}}, step times of one mean and
    the standard deviation spreads[label] (seconds). One panel per label, in the order of `spreads`: each rank's work and, stacked on
    it in gray, its wait at the barrier, for the first `shown` steps of the largest W; the last panel: the
    mean wait against W, measured (dots), the draws' own (crosses: the wait if the barrier were free) and
    the formula (H_W - 1) * spread (lines, up to max_workers)."""
    from .barrier import expected_wait

    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(9.8, 3.6),
                             gridspec_kw={"width_ratios": [1.2] * len(runs) + [1]})
    colours = plt.get_cmap("tab10")
    for ax, label in zip(axes, spreads):                      # panels in the order of `spreads`
        by_workers = runs[label]
        run = by_workers[max(by_workers)]
        ranks = len(run.delays)
        width = 0.8 / ranks
        for r in range(ranks):
            x = np.arange(min(shown, run.delays.shape[1])) + width * (r - (ranks - 1) / 2)
            work, wait = 1e3 * run.delays[r, :len(x)], 1e3 * run.waits[r, :len(x)]
            ax.bar(x, work, width=0.95 * width, color=colours(r % 10), label=f"rank {r}")
            ax.bar(x, wait, width=0.95 * width, bottom=work, color="0.8")
        ax.set_title(f"{label}: {ranks} workers", fontsize=10)
        ax.set_xticks(range(0, len(x), 2))
        ax.set_xlabel("step (gray: waiting at the barrier)")
        ax.set_ylabel("work and wait (ms)")
    axes[0].legend(fontsize=7, ncol=2)
    top = max(ax.get_ylim()[1] for ax in axes[:-1])
    for ax in axes[:-1]:
        ax.set_ylim(0, top)
    ax = axes[-1]
    W = np.arange(1, max_workers + 1)
    for i, label in enumerate(spreads):
        by_workers = runs[label]
        colour = plt.get_cmap("Dark2")(i)
        ax.plot(W, [1e3 * expected_wait(w, spreads[label]) for w in W], color=colour, label=label)
        ax.plot(list(by_workers), [1e3 * run.waits.mean() for run in by_workers.values()], "o", color=colour)
        ax.plot(list(by_workers), [1e3 * run.floor_waits.mean() for run in by_workers.values()], "x", color="black")
    ax.plot([], [], "o", color="0.4", label="measured")
    ax.plot([], [], "x", color="black", label="the draws alone")
    ax.set_xscale("log"); ax.set_xticks([1, 2, 4, 8, 16, 32, 64][:int(np.log2(max_workers)) + 1])
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter()); ax.minorticks_off()
    ax.set_xlabel("workers W"); ax.set_ylabel("mean wait per step (ms)")
    ax.set_title("lines: $(H_W - 1)\\cdot$spread", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
