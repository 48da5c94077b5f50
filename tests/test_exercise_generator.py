"""The exercise generator: exercises come from solutions, with every answer hidden and a failing check."""
import nbformat
import pytest

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
