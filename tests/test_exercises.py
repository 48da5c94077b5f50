"""Exercises come from solutions; their checks pass the solutions and fail the stubs, saying why."""
import nbformat
import numpy as np
import pytest

from syncml_lib import checks
from syncml_lib.exercises import BEGIN, END, clear_solution, make_exercise, stale
from helpers import ROOT

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_committed_exercises_are_what_the_build_makes():
    assert SOLUTIONS, "no solution notebooks found"
    assert stale() == [], "run `python -m syncml_lib.exercises build` (or `make exercises`) and commit"


def test_clear_solution_keeps_indentation_and_the_rest():
    source = f"def f(x):\n    {BEGIN}\n    return 2 * x\n    {END}\n\nprint(f)"
    assert clear_solution(source, ["# YOUR CODE HERE", "raise NotImplementedError()"]) == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f)")


@pytest.mark.parametrize("source", [f"{BEGIN}\nx = 1", f"x = 1\n{END}", f"{BEGIN}\n{BEGIN}\n{END}\n{END}"])
def test_unbalanced_markers_are_refused(source):
    with pytest.raises(ValueError):
        clear_solution(source, ["stub"])


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_every_answer_is_hidden_and_every_exercise_has_a_failing_check(solution):
    nb = nbformat.read(solution, as_version=4)
    answers = [c for c in nb.cells if BEGIN in c.source]
    check_cells = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
    assert answers and len(check_cells) >= len(answers)
    exercise = make_exercise(nb)
    assert not any("BEGIN SOLUTION" in c.source or c.get("outputs") for c in exercise.cells)
    for cell in exercise.cells:
        if "check" in cell.metadata.get("tags", []):
            assert "raises-exception" in cell.metadata["tags"]
            assert cell.source.lstrip().startswith("check_")


def exercise_functions(name):
    """Define the functions of an exercise (or solution) notebook's answer cells, as a learner would."""
    folder = "exercises" if name.startswith("exercise:") else "solutions"
    nb = nbformat.read(ROOT / folder / name.split(":")[1], as_version=4)
    namespace = {"__name__": "learner_notebook", "np": np}
    for cell in nb.cells:
        if cell.cell_type == "code" and "def " in cell.source and "cluster" not in cell.source:
            exec(cell.source, namespace)
    return namespace


def test_global_mean_check_passes_the_solution():
    ns = exercise_functions("solution:00_setup_and_tour.ipynb")
    for n in (1, 3, 4):
        checks.check_global_mean(ns["global_mean"], n=n)


def test_global_mean_check_fails_the_stub_and_says_it_is_not_written():
    ns = exercise_functions("exercise:00_setup_and_tour.ipynb")
    with pytest.raises(checks.CheckFailed, match="rank 0: trial 0 .*NotImplementedError: the exercise is not written"):
        checks.check_global_mean(ns["global_mean"], n=4)


def mean_of_means(comm, local_values):
    """The classic wrong answer: average the ranks' own means (wrong for uneven counts)."""
    means = comm.allgather(local_values.mean() if local_values.size else 0.0)
    return float(np.mean(means))


def test_global_mean_check_names_rank_trial_and_values_of_a_wrong_answer():
    with pytest.raises(checks.CheckFailed) as info:
        checks.check_global_mean(mean_of_means, n=3)
    message = str(info.value)
    assert "rank 0: trial 0 (lengths by rank [0," in message
    first_inputs = checks.global_mean_inputs(0, 3)
    expected = np.concatenate(first_inputs).mean()
    assert f"expected {expected:.6g}" in message


def hangs_on_rank_one(comm, local_values):
    if comm.rank != 1:
        comm.Barrier()
    return 0.0


def test_a_deadlocking_answer_fails_the_check_within_its_timeout():
    with pytest.raises(checks.CheckFailed, match="(?s)could not finish.*timed out"):
        checks.check_global_mean(hangs_on_rank_one, n=2, timeout=5)
