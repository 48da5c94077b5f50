"""Generate the exercise notebooks from the solution notebooks (nbgrader's conventions, no database).

    python -m syncml_lib.exercises build    # solutions/*.ipynb -> exercises/*.ipynb
    python -m syncml_lib.exercises check    # exit 1 if a committed exercise differs from what build makes

In a solution notebook the answer stands between `### BEGIN SOLUTION` and `### END SOLUTION`. In the
exercise notebook each such block becomes `# YOUR CODE HERE` + `raise NotImplementedError()` at the
same indentation (in Markdown cells: `YOUR ANSWER HERE`), outputs are cleared, and every cell tagged
`check` is also tagged `raises-exception`, so nbval expects the unfinished exercise to fail its check.
"""
import re
import sys
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
MARKDOWN_STUB = ["YOUR ANSWER HERE"]
ROOT = Path(__file__).resolve().parent.parent


def clear_solution(source, stub):
    """Replace each BEGIN/END SOLUTION block of `source` with `stub`, indented like the BEGIN line."""
    out, inside = [], False
    for line in source.splitlines():
        if line.strip() == BEGIN:
            if inside:
                raise ValueError(f"nested '{BEGIN}' in:\n{source}")
            inside = True
            indent = re.match(r"\s*", line).group()
            out += [indent + s for s in stub]
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"'{END}' without '{BEGIN}' in:\n{source}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"'{BEGIN}' without '{END}' in:\n{source}")
    return "\n".join(out)


def make_exercise(solution):
    """The exercise version of a solution notebook (a new NotebookNode)."""
    nb = nbformat.from_dict(solution)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.source = clear_solution(cell.source, CODE_STUB)
            cell.outputs, cell.execution_count = [], None
            tags = cell.metadata.get("tags", [])
            if "check" in tags and "raises-exception" not in tags:
                cell.metadata["tags"] = tags + ["raises-exception"]
        elif cell.cell_type == "markdown":
            cell.source = clear_solution(cell.source, MARKDOWN_STUB)
    return nb


def _pairs(root=ROOT):
    for solution in sorted((root / "solutions").glob("*.ipynb")):
        yield solution, root / "exercises" / solution.name


def generated_text(solution_path):
    return nbformat.writes(make_exercise(nbformat.read(solution_path, as_version=4))) + "\n"


def build(root=ROOT):
    """Write every exercise notebook; return the paths written."""
    written = []
    for solution, exercise in _pairs(root):
        exercise.parent.mkdir(exist_ok=True)
        exercise.write_text(generated_text(solution))
        written.append(exercise)
    return written


def stale(root=ROOT):
    """Exercise notebooks that are missing or differ from what build() would write."""
    return [exercise for solution, exercise in _pairs(root)
            if not exercise.exists() or exercise.read_text() != generated_text(solution)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["build"]:
        for path in build():
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    if argv == ["check"]:
        bad = stale()
        for path in bad:
            print(f"{path.relative_to(ROOT)} is not what `python -m syncml_lib.exercises build` makes")
        return 1 if bad else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
