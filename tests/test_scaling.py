"""scaling.measure_step under real mpiexec: the same row on every rank, the idle ranks released, and a
failed training run or a bad rank count refused on every rank (no rank left waiting)."""
from syncml_lib.mpirun import run


def job(comm):
    from syncml_lib.scaling import measure_step
    from syncml_lib.training import get_model

    found = {"row": measure_step(comm, 2, model=get_model("mlp"), batch_size=64, epochs=1, rounds=1)}
    for case, kwargs in {"bad batch": dict(p=2, batch_size=0), "too many ranks": dict(p=comm.size + 1, batch_size=64)}.items():
        try:
            measure_step(comm, model=get_model("mlp"), epochs=1, rounds=1, **kwargs)
            found[case] = None
        except ValueError as error:
            found[case] = str(error)
    found["afterwards"] = measure_step(comm, 1, model=get_model("mlp"), batch_size=64, epochs=1, rounds=1)["ranks"]
    return found


def test_measure_step_agrees_on_every_rank_and_refuses_bad_runs_everywhere():
    reports = run(job, 3, timeout=60)
    row = reports[0]["row"]
    assert row["ranks"] == 2 and row["batch"] == 64 and row["steps"] == 1437 // 64 - 2  # warm-up left out
    assert row["step"] >= row["compute"] > 0 and row["bytes_sent"] > 0 and 0 < row["accuracy"] <= 1
    for rank, report in enumerate(reports):
        assert report["row"] == row, rank                                   # rank 2 only waited, and got it too
        assert "measure_step: on rank 0, train on the first 2 ranks failed: ValueError: train: batch_size" in report["bad batch"], rank
        assert "p must be a rank count from 1 to 3, got 4" in report["too many ranks"], rank
        assert report["afterwards"] == 1


CONTROL = ("allgather", "allreduce", "bcast", "gather", "scatter", "alltoall", "barrier", "Split")


class CountingComm:
    """comm, counting the calls of its pickled (lower-case) collectives and of Split: the work a check adds."""

    def __init__(self, comm):
        self.comm, self.counts = comm, {}

    def __getattr__(self, name):
        attribute = getattr(self.comm, name)
        if name not in CONTROL:
            return attribute

        def counted(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return attribute(*args, **kwargs)
        return counted


def counted_hierarchy_calls(comm):
    """Run each timed call of bench.scaling once on a counting communicator: what it checks, and its answer."""
    import numpy as np

    from syncml_lib.allreduce import split_nodes
    from syncml_lib.bench.scaling import hierarchy_calls

    nodes = [0, 0, 1, 1]
    node_comm, leaders_comm = split_nodes(comm, nodes)
    x = np.random.default_rng(comm.rank).random(1001)
    expected = np.empty_like(x)
    comm.Allreduce(x, expected)
    found = {}
    for name in hierarchy_calls(comm, node_comm, leaders_comm, x, np.empty_like(x), nodes):
        counting = CountingComm(comm)
        out = np.empty_like(x)
        result = hierarchy_calls(counting, node_comm, leaders_comm, x, out, nodes)[name]()
        result = out if result is None else result
        found[name] = (counting.counts, bool(np.allclose(result, expected, rtol=1e-12)))
    node_comm.Free()
    if leaders_comm is not None:
        leaders_comm.Free()
    return found


def test_the_hierarchy_is_timed_like_for_like_against_the_flat_ring():
    """Each pair the benchmark (and chapter 07, which runs it) compares makes the same checks: the kept
    levels and the ring with check=False none; hierarchical_allreduce and the ring with check=True one
    allgather each, the hierarchy's two Split being what it costs on top."""
    for rank, found in enumerate(run(counted_hierarchy_calls, 4, timeout=60)):
        assert all(correct for _, correct in found.values()), (rank, found)
        counts = {name: c for name, (c, _) in found.items()}
        assert counts["flat ring"] == counts["levels"] == counts["MPI Allreduce"] == {}, (rank, counts)
        assert counts["flat ring, checked"] == {"allgather": 1}, (rank, counts)
        assert counts["hierarchical"] == {"allgather": 1, "Split": 2}, (rank, counts)


def test_chapter_07_times_the_hierarchy_with_the_benchmarks_calls():
    """The notebook's timing cell runs bench.scaling.hierarchical_rows, not timing code of its own (it once
    timed the ring with its check against the hierarchy's levels without one)."""
    import json
    from pathlib import Path

    notebook = Path(__file__).parent.parent / "notebooks" / "07_performance_and_open_problems.ipynb"
    cells = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    timing = [c for c in cells if c.startswith("%%px") and ("allreduce_in_levels" in c or "hierarchical_rows" in c)]
    assert timing and all("hierarchical_rows(" in c and "perf_counter" not in c for c in timing), timing
