"""The benchmarks (syncml_lib.bench) under real mpiexec on 2, 3 and 4 ranks with tiny arguments: the
rows each rank count allows, the configurations skipped and why, the rank counts refused; MPICH's
progress throttle when main() is called from Python; and costmodel.predict_ps."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from syncml_lib import costmodel
from syncml_lib.allreduce import ALGORITHMS
from syncml_lib.costmodel import predict, predict_ps, ps_over_ring
from syncml_lib.mpirun import run, run_script

PARAMS = dict(alpha=1e-5, beta=1e-9, gamma=1e-10)
THROTTLE = "MPIR_CVAR_CH4_PROGRESS_THROTTLE"


def bench(n, *args, check=True):
    """`mpiexec -n n python -m syncml_lib.bench *args`: its stdout (and with check=False its stderr and
    return code). A run that must succeed calls bench's main(args) on the n ranks of a reused job
    (syncml_lib.mpirun.run, as the other tests: no mpiexec started for it) and gives what the ranks
    printed; the runs that must fail, and the throttle test below, run the real command."""
    if not check:
        return run_script(["-m", "syncml_lib.bench", *args], n=n, timeout=60, check=False)
    return SimpleNamespace(stdout="".join(run(printed_by_main, n, list(args), timeout=60)))


def printed_by_main(comm, argv):
    """On each rank: what syncml_lib.bench's main(argv) prints."""
    import contextlib
    import io

    from syncml_lib.bench.__main__ import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(argv)
    return printed.getvalue()


def rows_of(out, first_cell):
    """The table lines whose first cell is first_cell (cells are right-aligned: strip first)."""
    return [line for line in out.splitlines() if line.strip().startswith(first_cell + " |")]


def skip_note(servers, p):
    return (f"{servers} servers on {p} ranks leaves {p - servers} worker: "
            f"no allreduce among the workers to compare with; skipped")


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_allreduce_benchmark_prints_a_row_per_size(n):
    out = bench(n, "allreduce", "--sizes", "8", "1K", "64K", "--repeat", "2").stdout
    assert f"allreduce of float64 arrays on {n} ranks" in out, out
    assert " ".join(["size | MPI Allreduce |", " | ".join(ALGORITHMS), "| auto | pickle allreduce | auto picked"]) \
        in " ".join(out.split()), out                                # columns are padded: compare with single spaces
    for size, nbytes in (("8 B", 8), ("1 KB", 1 << 10), ("64 KB", 64 << 10)):
        rows = rows_of(out, size)
        assert len(rows) == 1, out
        cells = [cell.strip() for cell in rows[0].split("|")]
        assert cells[-1] == costmodel.choose(nbytes, n), rows[0]     # what auto picks on n ranks
        assert sum(cell.endswith("x)") for cell in cells) == len(ALGORITHMS) + 2, rows[0]  # + auto, pickle


@pytest.mark.parametrize("n", [3, 4])
def test_the_ps_benchmark_prints_a_row_per_configuration(n):
    out = bench(n, "ps", "--size", "10000", "--steps", "3", "--rounds", "2").stdout
    for config, servers in [("1 server BSP", 1), ("1 server ASP", 1), ("2 servers BSP", 2), ("2 servers ASP", 2)]:
        workers = n - servers
        rows = rows_of(out, config)
        if workers < 2:                                              # no allreduce among 1 worker
            assert rows == [] and f"{config}: measured" not in out, out
            continue
        assert len(rows) == 1, out
        cells = [cell.strip() for cell in rows[0].split("|")]
        assert cells[1:3] == [str(workers), str(servers)], rows[0]
        assert cells[-1] == " + ".join([f"{2 * workers * 10000 // servers} B"] * servers), rows[0]
        assert f"{config}: measured" in out and "1.5x" in out
    assert "ring allreduce (same W)" in out and "MPI Allreduce" in out and "median over 2 runs" in out
    assert (skip_note(2, n) in out) == (n == 3), out


def test_the_ps_benchmark_runs_with_the_throttle_when_main_is_called_from_python(tmp_path):
    """main(["ps", ...]) from a script turns MPICH's progress throttle on before MPI starts, and the
    table says what MPI uses; a script that started MPI first gets a one-line warning instead."""
    script = tmp_path / "ps_from_python.py"
    script.write_text(
        "import os, sys\n"
        f"os.environ.pop({THROTTLE!r}, None)  # as a plain mpiexec starts it (syncml_lib.mpirun sets it)\n"
        "if sys.argv[1] == 'mpi first':\n"
        "    from mpi4py import MPI\n"
        "from syncml_lib.bench import main\n"
        "main(['ps', '--size', '1000', '--steps', '3', '--rounds', '1', '--repeat', '3'])\n")
    ok = run_script([script, "bench first"], n=3, timeout=60)
    assert f"{THROTTLE}=1" in ok.stdout and "warning" not in ok.stderr, ok.stdout + ok.stderr
    # what it measures, as it goes: on stderr, once (rank 0), before the table
    assert ok.stderr.count("measuring 1 server BSP, round 1 of 1 ...") == 1, ok.stderr
    late = run_script([script, "mpi first"], n=3, timeout=60)
    assert f"{THROTTLE}=0" in late.stdout, late.stdout
    warnings = [line for line in late.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "MPI started before" in warnings[0], late.stderr


@pytest.mark.parametrize("env, expected", [("1", "1"), ("0", "0"), (None, "0")])  # MPICH's default: off
def test_progress_throttle_reads_what_mpi_uses(env, expected):
    environ = {k: v for k, v in os.environ.items() if k != THROTTLE} | ({THROTTLE: env} if env else {})
    code = "from syncml_lib.bench.common import progress_throttle; print(progress_throttle())"
    proc = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == expected, proc.stdout + proc.stderr


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_data_benchmark_prints_both_tables(n):
    out = bench(n, "data", "--sizes", "8K", "64K", "--repeat", "5").stdout
    kvstore = n >= 3                                                 # 2 servers and a client
    headers = {"MPI Scatterv | scatter_rows | Bcast + slice": True,
               "MPI Send + reply | kv put, R=1 | kv put, R=2 | kv get": kvstore}
    for header, shown in headers.items():
        assert (header in " ".join(out.split())) == shown, out       # columns are padded: compare with single spaces
    assert ("key-value store needs 3 ranks" in out) == (not kvstore), out
    for size in ("8 KB", "64 KB"):
        rows = rows_of(out, size)
        assert len(rows) == (2 if kvstore else 1), out               # one in each table
        assert all(line.count("x)") == len(line.split("|")) - 1 for line in rows), rows
        assert all("(1.00x)" in line.split("|")[1] for line in rows), rows  # the first column is the reference


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_tasks_benchmark_prints_a_row_per_task_time(n):
    out = bench(n, "tasks", "--tasks", "12", "--repeat", "3").stdout
    assert f"task scheduling on {n} ranks (1 master, {n - 1} workers)" in out, out
    rows = rows_of(out, "12")
    assert len(rows) == 2, out                                       # empty tasks, then 1 ms tasks
    assert all(line.count("x)") == 6 and "(1.00x)" in line.split("|")[2] for line in rows), rows
    assert "per hand-out" in out


def test_the_train_benchmark_prints_a_row_per_mechanism_and_per_bucket_layout():
    out = bench(4, "train", "--epochs", "1", "--target", "0.5", "--hidden", "16", "16", "--bucket-steps", "2",
                "--repeat", "2").stdout
    from syncml_lib.bench.train import MECHANISM_RUNS

    for label, _, _ in MECHANISM_RUNS:
        rows = rows_of(out, label)
        assert len(rows) == 1 and len(rows[0].split("|")) == 6, out
        assert "(epoch 1)" in rows[0] and rows[0].strip().endswith("%"), rows[0]  # 0.5 is reached after 1 epoch
    # the MLP 64-16-16-10 in backward order: 16*10+10, 16*16+16, 64*16+16 floats
    layers = [170 * 8, 272 * 8, 1040 * 8]
    expected = {"3 (one per layer)": layers, f"2 (cap {(layers[0] + layers[1]) / 1024:.1f} KB)":
                [layers[0] + layers[1], layers[2]], "1 (one for everything)": [sum(layers)]}
    for label, sizes in expected.items():
        rows = rows_of(out, label)
        assert len(rows) == 1 and rows[0].count("x") >= 4, out
        assert rows[0].split("|")[1].strip() == " + ".join(f"{n / 1024:.1f} KB" for n in sizes), rows[0]
    assert "ratios to one MPI Allreduce" in out


@pytest.mark.parametrize("command, n, at_least", [("allreduce", 1, 2), ("ps", 1, 3), ("ps", 2, 3), ("data", 1, 2),
                                                  ("tasks", 1, 2), ("train", 1, 2), ("scaling", 1, 2)])
def test_a_benchmark_refuses_a_rank_count_where_nothing_can_run(command, n, at_least):
    proc = bench(n, command, check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    message = f"bench {command} needs at least {at_least} ranks"
    assert proc.stderr.count(message) == n, proc.stderr            # said by every rank
    assert "Traceback" not in proc.stderr and "|" not in proc.stdout, proc.stdout + proc.stderr


def test_predict_ps_by_hand():
    a, b, g, n = 1.0, 0.01, 0.001, 1200  # W=3, S=2: server 12 a + 2*3*600 b + 9*600 g; worker 8 a + 2400 b + 1200 g
    # BSP: the server also waits while the last worker puts its 1200 bytes together (1200 g)
    assert predict_ps(n, 3, 2, a, b, g) == pytest.approx(max(12 + 36 + 5.4 + 1.2, 8 + 24 + 1.2))
    assert predict_ps(n, 1, 3, a, b, g) == pytest.approx(max(4 + 8 + 2 + 1.2, 12 + 24 + 1.2))  # S > W: the worker
    # SSP and ASP apply each of the W gradients alone (2 passes each) and copy for W pulls: 3W = 9 passes
    assert predict_ps(n, 3, 2, a, b, g, mode="asp") == pytest.approx(max(12 + 36 + 5.4, 8 + 24 + 1.2))
    assert predict_ps(n, 4, 2, a, b, g, mode="ssp") == pytest.approx(16 + 48 + 12 * 600 * g)  # 3W = 12 > 2W + 3
    assert predict_ps(n, 4, 2, a, b, g, mode="bsp") == pytest.approx(16 + 48 + 11 * 600 * g + 1200 * g)
    with pytest.raises(ValueError, match="unknown mode 'bssp'"):
        predict_ps(n, 3, 2, a, b, g, mode="bssp")


def test_two_servers_halve_the_server_time_when_bandwidth_bound():
    n = 1 << 30
    one, two = predict_ps(n, 4, 1, **PARAMS, mode="asp"), predict_ps(n, 4, 2, **PARAMS, mode="asp")
    assert two == pytest.approx(one / 2, rel=1e-3)
    # in BSP all but the last worker's assembly (n gamma, the same for any S) halves
    one, two = predict_ps(n, 4, 1, **PARAMS), predict_ps(n, 4, 2, **PARAMS)
    assert two - n * PARAMS["gamma"] == pytest.approx((one - n * PARAMS["gamma"]) / 2, rel=1e-3)


def test_predict_ps_grows_with_workers_and_size_and_is_positive():
    times = [predict_ps(8 << 20, w, 1, **PARAMS) for w in range(1, 9)]
    assert all(t > 0 for t in times)
    assert all(t0 < t1 for t0, t1 in zip(times, times[1:]))
    sizes = [predict_ps(n, 3, 2, **PARAMS) for n in (0, 8, 1 << 10, 1 << 20)]
    assert all(t0 < t1 for t0, t1 in zip(sizes, sizes[1:]))
    with pytest.raises(ValueError, match="worker"):
        predict_ps(8, 0, 1, **PARAMS)


def test_ps_over_ring_compares_with_a_ring_among_the_workers():
    n, w, s = 8 << 20, 3, 1
    assert ps_over_ring(n, w, s, **PARAMS) == pytest.approx(predict_ps(n, w, s, **PARAMS) / predict("ring", n, w, **PARAMS))
    # bandwidth-bound, gamma = 0: W^2 / (S (W-1))
    assert ps_over_ring(1 << 34, 3, 1, 1e-6, 1e-9) == pytest.approx(4.5, rel=1e-3)
    assert ps_over_ring(1 << 34, 2, 2, 1e-6, 1e-9) == pytest.approx(2.0, rel=1e-3)
    assert ps_over_ring(n, 1, 1, **costmodel.DEFAULT_PARAMS) == float("inf")


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_sync_benchmark_prints_every_barrier_and_update_method_with_its_losses(n):
    out = bench(n, "sync", "--steps", "5", "--rounds", "6", "--repeat", "2").stdout
    assert f"a step of synchronization only on {n} ranks" in out and f"{n - 1} workers, 6 rounds" in out, out
    for barrier in ("MPI Barrier", "Ibarrier, waited asleep", "clock messages, BSP", "clock messages, SSP s=1"):
        assert len(rows_of(out, barrier)) == 1, out
    made = 6 * (n - 1)
    cells = {row.split("|")[0].strip(): [c.strip() for c in row.split("|")[1:]]
             for name in ("MPI Accumulate", "add", "overwrite", "cas", "overwrite, gated", "cas, gated")
             for row in rows_of(out, name)}
    assert len(cells) == 6, out
    assert cells["MPI Accumulate"][1:] == ["1.00x", f"0 of {made}", "none (one-sided)"]
    assert cells["add"][2:] == [f"0 of {made}", "1.00"] and cells["cas"][2] == cells["cas, gated"][2] == f"0 of {made}"
    assert cells["overwrite, gated"][2:] == [f"{6 * (n - 2)} of {made}", "2.00"]   # one kept per round


def test_the_sync_benchmark_refuses_one_rank():
    result = bench(1, "sync", check=False)
    assert result.returncode != 0 and "bench sync needs at least 2 ranks (a server and a worker)" in result.stderr


def test_the_engines_benchmark_prints_its_three_tables_and_no_makespan_beats_the_lower_bound():
    done = subprocess.run([sys.executable, "-m", "syncml_lib.bench", "engines", "--engines", "2", "--tasks", "20",
                           "--repeat", "1"], capture_output=True, text=True, timeout=120, check=True)
    out = done.stdout
    assert [line for line in done.stderr.splitlines() if line.startswith("measuring")] == [
        "measuring throughput: 20 empty tasks, 1 rounds ...", "measuring recovery from a killed engine ...",
        "measuring makespans of two task graphs ..."], done.stderr
    assert "20 empty tasks on 2 plain engines" in out, out
    for name in ("EngineScheduler", "EngineScheduler, per_engine=2", "load-balanced view"):
        assert len(rows_of(out, name)) == 2, (name, out)   # throughput and recovery
    assert rows_of(out, "load-balanced view")[0].split("|")[-1].strip() == "1.00x", out   # the reference
    for graph in ("random, 32 tasks, 128 edges", "12 short tasks, then a chain of 4"):
        (row,) = rows_of(out, graph)
        ratios = [float(cell.split("(")[1].rstrip("x) ")) for cell in row.split("|")[2:]]
        assert len(ratios) == 3 and all(r >= 0.98 for r in ratios), row   # 2 % for the clocks' resolution


def test_the_engines_benchmark_refuses_to_run_under_mpiexec():
    result = bench(2, "engines", check=False)
    assert result.returncode != 0 and "run it without mpiexec" in result.stderr, result.stderr


@pytest.mark.parametrize("n", [2, 3])
def test_the_scaling_benchmark_prints_its_three_tables(n):
    out = bench(n, "scaling", "--epochs", "1", "--sizes", "8", "64K", "--repeat", "3").stdout
    from syncml_lib.bench.scaling import COMPRESSORS

    assert out.count("the median step of the slowest rank on the first p ranks") == 2, out  # the two models
    for p in range(1, n + 1):
        rows = rows_of(out, str(p))
        assert len(rows) == 2 and all(len(row.split("|")) == 6 for row in rows), out  # strong and weak, each model
        assert all(f"| {60 * p:>11} |" in row for row in rows), rows                  # weak: 60 examples per rank
    for size in ("8 B", "64 KB"):
        rows = rows_of(out, size)
        assert len(rows) == 1 and rows[0].count("x)") == 4, out   # ring, levels, checked ring, hierarchical vs MPI
    for label in COMPRESSORS:
        rows = rows_of(out, label)
        assert len(rows) == 1 and "points" in rows[0], out
    saved = {label: rows_of(out, label)[0].split("|")[2].strip() for label in COMPRESSORS}
    ring, int8 = 2 * (n - 1) / n * 8 * 9611, (n - 1) * (9610 + 8)  # bytes per rank: ring allreduce, allgather of int8
    assert saved["none"] == "1x" and saved["8-bit"] == f"{ring / int8:.0f}x", saved
