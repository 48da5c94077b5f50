"""`python -m syncml_lib grade`: every solution grades all-passed, a committed exercise all-failed
(each check saying the exercise is not written yet), one wrong answer fails exactly its check, and a
notebook that hangs or raises outside its checks is reported without stopping the others.

These are also the suite's nbval runs of solutions/: grade runs each notebook under nbval (lax), then
asserts more than nbval does (a check cell tagged raises-exception passes nbval whether or not it raises;
here an exercise's check must fail, and say why). Every other exercise notebook is its solution with
stubs (test_exercise_generator), and each stub fails its check (test_exercises), so those notebooks are
not run again."""
import json
import re

import nbformat
import pytest

from syncml_lib.grade import all_passed, grade_notebook, main, table
from helpers import ROOT

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def check_cells(path):
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code" and "check" in c.metadata.get("tags", [])]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_every_solution_grades_all_passed(path, shared_cluster):
    rows = grade_notebook(path)
    assert all_passed(rows), table(rows)
    assert [row.check for row in rows] == [re.search(r"check_\w+", c.source).group() for c in check_cells(path)]


# One exercise notebook end to end: the others differ from it only in what test_exercise_generator and
# test_exercises prove (each is its solution with stubs; each stub fails its check), so grading all of them
# again cost a minute of the suite and proved nothing more (#24).
@pytest.mark.parametrize("path", EXERCISES[:1], ids=lambda p: p.name)
def test_a_committed_exercise_grades_all_failed_saying_it_is_not_written(path, shared_cluster):
    rows = grade_notebook(path)
    assert len(rows) == len(check_cells(path)) > 0, table(rows)  # no row for a problem outside the checks
    for row in rows:
        assert row.result == "failed", table(rows)
        # on the ranks (most checks), or in the kernel (chapter 05b's, whose scheduler runs there)
        assert re.search(r"(failed on \d of \d ranks; ranks? [\d, ]+|^\w+\(.*\)): .*NotImplementedError: the "
                         r"exercise is not written yet", row.detail), row.detail


def test_one_wrong_answer_fails_exactly_that_check(tmp_path, shared_cluster):
    """The classic mistake of chapter 05's last exercise: a second result overwrites the first."""
    nb = nbformat.read(ROOT / "solutions" / "05_task_scheduling.ipynb", as_version=4)
    answer = next(c for c in nb.cells if c.source.startswith("def record_result("))
    answer.source = "def record_result(done, task, result):\n    done[task] = result\n    return True\n"
    path = tmp_path / "05_task_scheduling.ipynb"
    nbformat.write(nb, path)
    rows = grade_notebook(path)
    assert [(row.check, row.result) for row in rows] == [
        ("check_guided_chunk", "passed"), ("check_expired_leases", "passed"), ("check_record_result", "failed"),
        ("check_factoring_chunks", "passed")]
    assert rows[2].detail.startswith("failed on "), rows[2].detail


def small_notebook(path, *cells):
    """A notebook of code cells; a cell given as ("check", source) is tagged `check`."""
    nb = nbformat.v4.new_notebook()
    for cell in cells:
        tags, source = (["check", "raises-exception"], cell[1]) if isinstance(cell, tuple) else ([], cell)
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    nbformat.write(nb, path)
    return path


def test_a_hanging_or_broken_notebook_is_reported_and_the_others_still_graded(tmp_path, capsys):
    passing = "def check_sum():\n    assert 1 + 1 == 2\ncheck_sum()"
    folder = tmp_path / "submissions"
    folder.mkdir()
    small_notebook(folder / "01_hangs.ipynb", ("check", passing), "import time\ntime.sleep(600)",
                   ("check", "check_sum()"))
    small_notebook(folder / "02_broken.ipynb", "x = undefined_name", ("check", passing))
    small_notebook(folder / "03_done.ipynb", ("check", passing))
    (folder / "04_not_a_notebook.ipynb").write_text("{")

    status = main(["--json", "--time-limit", "5", str(folder)])
    printed = capsys.readouterr()
    rows = json.loads(printed.out)                                   # --json: stdout is one JSON document
    progress = [line.split("/")[-1] for line in printed.err.splitlines()]  # a line per notebook as it ends
    assert [re.sub(r"\(\d+\.\d s\)$", "(t s)", line) for line in progress] == [
        "01_hangs.ipynb: 1 of 2 checks passed; timed out (t s)",
        "02_broken.ipynb: 1 of 1 checks passed; error (t s)",
        "03_done.ipynb: 1 of 1 checks passed (t s)",
        "04_not_a_notebook.ipynb: 0 of 0 checks passed; error (t s)"], progress
    assert status == 1
    got = [(row["notebook"].split("/")[-1], row["check"], row["result"]) for row in rows]
    assert got == [
        ("01_hangs.ipynb", "check_sum", "passed"),
        ("01_hangs.ipynb", "check_sum", "not run"),
        ("01_hangs.ipynb", "(notebook)", "timed out"),
        ("02_broken.ipynb", "(notebook)", "error"),
        ("02_broken.ipynb", "check_sum", "passed"),
        ("03_done.ipynb", "check_sum", "passed"),
        ("04_not_a_notebook.ipynb", "(notebook)", "error"),
    ], rows
    assert "NameError: name 'undefined_name' is not defined" in rows[3]["detail"]
    assert "still running after 5 s" in rows[2]["detail"]

    assert main([str(folder / "03_done.ipynb")]) == 0
    assert "1 of 1 checks passed" in capsys.readouterr().out


def test_a_missing_path_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no/such/notebook.ipynb"])
    assert exit_.value.code == 2
    assert "no such file or folder: no/such/notebook.ipynb" in capsys.readouterr().err
