"""The benchmark commands given to a learner (#23) are the one form that works from a terminal in the
course folder, `make bench BENCH=<name>`: not `mpiexec -n 4 python -m syncml_lib.bench ...`, whose
`mpiexec` and `python` are the course's only inside its environment. Checked for the files that have
been brought to that form: every chapter that names a benchmark, the README, and the benchmarks' own
docstrings and messages."""
import json
import os
import re
import subprocess

import pytest

from helpers import ROOT

BARE_COMMAND = re.compile(r"mpiexec(\.gforker)?\s+-n\s+\d+\s+\S*python\S*\s+-m\s+syncml_lib\.bench")
CHAPTERS = {"01_why_synchronize.ipynb": "sync", "02_parameter_server.ipynb": "ps", "03_allreduce.ipynb": "allreduce",
            "04_data_storage.ipynb": "data", "05_task_scheduling.ipynb": "tasks",
            "06_data_parallel_training.ipynb": "train"}


def markdown(name):
    cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.parametrize("name, bench", CHAPTERS.items())
def test_the_chapter_names_its_benchmark_as_make_bench(name, bench):
    text = markdown(name)
    assert not BARE_COMMAND.search(text), BARE_COMMAND.search(text)
    assert f"`make bench BENCH={bench}`" in text


def benchmarks():
    from syncml_lib.bench.__main__ import parser

    commands = next(a for a in parser()._actions if a.dest == "command")
    return sorted(commands.choices)


def test_the_readme_lists_every_benchmark_as_make_bench_and_nothing_else():
    text = (ROOT / "README.md").read_text()
    assert not BARE_COMMAND.search(text), BARE_COMMAND.search(text)
    listed = re.findall(r"^make bench(?: BENCH=(\w+))?\s", text, flags=re.M)
    assert sorted(name or "allreduce" for name in listed) == benchmarks()


@pytest.mark.parametrize("ranks", [None, 2])
def test_make_bench_runs_the_course_mpiexec_with_the_ranks_the_readme_says(ranks):
    command = ["make", "-n", "-C", str(ROOT), "bench", "BENCH=sync"] + ([f"RANKS={ranks}"] if ranks else [])
    one_machine = {k: v for k, v in os.environ.items() if k != "SYNCML_NETWORK"}
    printed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, env=one_machine).stdout
    assert re.search(rf"/\.venv/bin/mpiexec\.gforker -n {ranks or 4} \S+/\.venv/bin/python -m syncml_lib\.bench sync ?$",
                     printed, flags=re.M), printed


def test_no_notebook_and_no_library_file_tells_the_learner_a_bare_mpiexec_benchmark_command():
    files = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "syncml_lib").rglob("*.py"))
    bare = [str(f.relative_to(ROOT)) for f in files if BARE_COMMAND.search(f.read_text())]
    assert bare == []


def test_make_bench_passes_a_benchmarks_options_through_bench_args():
    command = ["make", "-n", "-C", str(ROOT), "bench", "BENCH=allreduce", "BENCH_ARGS=--max-size 1M"]
    one_machine = {k: v for k, v in os.environ.items() if k != "SYNCML_NETWORK"}
    printed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, env=one_machine).stdout
    assert re.search(r"-m syncml_lib\.bench allreduce --max-size 1M$", printed, flags=re.M), printed
