"""The committed notebooks are as a learner should find them (nbval then runs them: see `make test`)."""
import json
import re

import pytest

from helpers import ROOT

EXECUTED = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_chapters_and_solutions_are_stored_executed_and_clean(path):
    cells = code_cells(path)
    assert all(c["execution_count"] for c in cells), "run `make notebooks` and commit the result"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), "executed top to bottom in one go"
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]


@pytest.mark.parametrize("path", EXECUTED + EXERCISES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_notebook_uses_the_course_kernel_and_stops_its_cluster(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "syncml"
    code = "".join("".join(c["source"]) for c in code_cells(path))
    if "cluster" in code:  # all but 05b's exercises, whose checks start and stop clusters of their own
        assert re.search(r"start_(mpi|engine)_cluster\(", code), path
        assert code_cells(path)[-1]["source"] in ("cluster.stop_cluster_sync()", ["cluster.stop_cluster_sync()"])


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_exercises_are_stored_without_outputs(path):
    assert all(not c["outputs"] and c["execution_count"] is None for c in code_cells(path))
