"""Grade exercise notebooks: run each one headless and say, check by check, what passed.

    python -m syncml_lib grade exercises/03_allreduce.ipynb       # one notebook
    python -m syncml_lib grade submissions/                        # every notebook in a folder, recursively
    python -m syncml_lib grade --json --time-limit 300 a.ipynb b.ipynb

Each notebook runs top to bottom under nbval (as `make test` runs the course's own notebooks), in a
process and a fresh kernel of its own, so it starts (first cell) and stops (last cell) a cluster of its
own, exactly as in JupyterLab. A cell that raises does not stop the run: every check still gets its turn. Then there is one row per check cell (a cell tagged `check`):
passed, failed (with the first line of what the check said) or not run. A notebook that raises outside
its checks, or that outlives its time limit, gets a row of its own for that; the next notebook is
graded all the same. The exit status is 0 only if every check of every notebook passed.
"""
import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat

from .cluster import TAG_VARIABLE, stop_clusters

__all__ = ["Row", "grade_notebook", "grade", "main"]

TIME_LIMIT = 600  # seconds per notebook: the slowest solution notebook runs in about 15 s


@dataclass
class Row:
    """One line of the report: a check and how it went, or a problem of the whole notebook."""
    notebook: str
    chapter: str
    check: str     # the check function's name, or "(notebook)" for a problem outside the checks
    result: str    # "passed", "failed", "not run", "error" or "timed out"
    detail: str = ""


def _first_lines(error):
    """'failed on 4 of 4 ranks; rank 0: ...' from a check's CheckFailed (title line, then its first problem),
    or 'NameError: name 'x' is not defined' from any other exception."""
    lines = [line.strip() for line in error.get("evalue", "").splitlines() if line.strip()]
    if error.get("ename") != "CheckFailed" or not lines:
        return f"{error.get('ename', 'error')}: {lines[0] if lines else ''}".rstrip(": ")
    title = lines[0].split(": ", 1)[-1]  # "check_x: failed on ..." -> "failed on ..."
    return "; ".join([title] + lines[1:2])


def _errors(cell):
    return [output for output in cell.get("outputs", []) if output.get("output_type") == "error"]


def _rows(path, nb, problem=None):
    """The report's rows for an executed (or partly executed) notebook."""
    chapter = path.stem.split("_", 1)[0]
    rows = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = _errors(cell)
        if "check" in cell.metadata.get("tags", []):
            name = (re.search(r"\bcheck_\w+", cell.source) or re.search(r"\S+", cell.source or "?")).group()
            if errors:
                rows.append(Row(str(path), chapter, name, "failed", _first_lines(errors[0])))
            elif cell.get("execution_count") is None:
                rows.append(Row(str(path), chapter, name, "not run", "the notebook stopped before this cell"))
            else:
                rows.append(Row(str(path), chapter, name, "passed"))
        elif errors:
            rows.append(Row(str(path), chapter, "(notebook)", "error",
                            f"code cell {index} (not a check) raised {_first_lines(errors[0])}"))
    if problem:
        rows.append(Row(str(path), chapter, "(notebook)", *problem))
    if not any(row.check != "(notebook)" for row in rows):
        rows.append(Row(str(path), chapter, "(notebook)", "error", "no check cell (a cell tagged `check`) in it"))
    return rows


def grade_notebook(path, time_limit=TIME_LIMIT):
    """Run one notebook under nbval in a process of its own (every cell, errors kept) within time_limit
    seconds; its rows."""
    path = Path(path)
    chapter = path.stem.split("_", 1)[0]
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:
        return [Row(str(path), chapter, "(notebook)", "error", f"not a readable notebook: {exc}")]
    # the kernel's clusters carry a tag of this grading run, so none can outlive it
    tag = f"{os.environ.get(TAG_VARIABLE, 'syncml')}-grade{os.getpid()}x{time.monotonic_ns() % 10**6}"
    problem = None
    with tempfile.TemporaryDirectory() as folder:
        record = Path(folder) / "cells.jsonl"
        run = subprocess.Popen([sys.executable, "-m", "syncml_lib.grade", "--run-nbval", str(path.resolve()), str(record),
                                str(time_limit)], env={**os.environ, TAG_VARIABLE: tag}, cwd=folder,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            said, _ = run.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            said, _ = run.communicate()
            problem = ("timed out", f"still running after {time_limit:g} s: stopped (a cell that hangs?)")
        finally:
            stop_clusters(tag=f"{tag}-")
            _end_tagged(tag)
        ran = {}
        if record.exists():
            for line in record.read_text().splitlines():
                cell = json.loads(line)
                ran[cell["cell"]] = cell["errors"]
    if not ran and problem is None:
        last = [line for line in said.splitlines() if line.strip()][-1:] or ["no output"]
        problem = ("error", f"nbval could not run it: {last[0]}")
    for number, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = ran.get(number, [])
        cell.execution_count = number + 1 if number in ran else None
    return _rows(path, nb, problem)


def _end_tagged(tag, grace=5.0):
    """Wait up to `grace` seconds for every process started by this grading run (its environment carries
    the run's tag: the kernel, its clusters' controllers, engines, nannies and watchers) to exit, then
    SIGKILL what is left, so that nothing outlives the run. Reads /proc; elsewhere it does nothing."""
    def tagged():
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"{TAG_VARIABLE}={tag}\0".encode() in environ.read_bytes() + b"\0":
                    found.append(int(environ.parent.name))
            except (OSError, ValueError):
                pass
        return found
    deadline = time.monotonic() + grace
    while tagged() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in tagged():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class _CellRecorder:
    """A pytest plugin for the nbval run of one notebook: after each code cell, one JSON line with the
    cell's number among the code cells and its error outputs (nbval keeps a cell's outputs in
    `test_outputs`; a cell tagged raises-exception passes nbval with its error kept there too)."""

    def __init__(self, record):
        self.record = record

    def pytest_runtest_makereport(self, item, call):
        if call.when == "call" and hasattr(item, "cell_num"):
            errors = [{k: out.get(k) for k in ("output_type", "ename", "evalue")}
                      for out in item.test_outputs or [] if out.get("output_type") == "error"]
            with open(self.record, "a") as f:
                f.write(json.dumps({"cell": item.cell_num, "errors": errors}) + "\n")


def _run_nbval(notebook, record, time_limit):
    """nbval (lax: a cell passes if it does not raise) on one notebook, recording every cell."""
    import pytest

    return pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", "-c", os.devnull,
                        "--rootdir", str(Path(notebook).parent), "--nbval-lax", "--nbval-current-env",
                        f"--nbval-cell-timeout={time_limit + 60}", notebook], plugins=[_CellRecorder(record)])


def notebooks_in(paths):
    """The notebooks named, and those in the folders named (recursively, checkpoints left out), sorted."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        else:
            found.append(path)
    return found


def grade(paths, time_limit=TIME_LIMIT, progress=None):
    """Grade every notebook of `paths`, one after the other; all their rows. progress(line), if given, is
    called as each notebook finishes: its name, its checks passed, its seconds."""
    rows = []
    for path in notebooks_in(paths):
        started = time.perf_counter()
        mine = grade_notebook(path, time_limit)
        rows += mine
        if progress:
            passed = sum(row.result == "passed" for row in mine)
            checks = sum(row.check != "(notebook)" for row in mine)
            trouble = [row.result for row in mine if row.check == "(notebook)"]
            progress(f"{path}: {passed} of {checks} checks passed{'; ' + ', '.join(trouble) if trouble else ''} "
                     f"({time.perf_counter() - started:.1f} s)")
    return rows


def table(rows):
    """The rows as a text table, a line each; the detail (the first line of what went wrong) in full."""
    heads = ("notebook", "check", "result")
    cols = [max([len(h)] + [len(str(getattr(r, h))) for r in rows]) for h in heads]
    lines = ["  ".join(h.ljust(c) for h, c in zip(heads, cols)) + "  detail"]
    for row in rows:
        lines.append("  ".join([str(getattr(row, h)).ljust(c) for h, c in zip(heads, cols)] + [row.detail]).rstrip())
    passed = sum(row.result == "passed" for row in rows)
    checks = sum(row.check != "(notebook)" for row in rows)
    lines.append(f"{passed} of {checks} checks passed" + ("" if all_passed(rows) else "; not done yet"))
    return "\n".join(lines)


def all_passed(rows):
    return bool(rows) and all(row.result == "passed" for row in rows)


def main(argv):
    if argv[:1] == ["--run-nbval"]:  # grade_notebook's own process
        return _run_nbval(argv[1], argv[2], float(argv[3]))
    parser = argparse.ArgumentParser(prog="python -m syncml_lib grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="notebooks, or folders of notebooks (searched recursively)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT, metavar="SECONDS",
                        help=f"per notebook (default {TIME_LIMIT})")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    rows = grade(args.paths, args.time_limit, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps([asdict(row) for row in rows], indent=1) if args.json else table(rows))
    return 0 if all_passed(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
