"""bench.py's `ps` subcommand (a smoke test under real mpiexec) and costmodel.predict_ps."""
import pytest

from syncml_lib import costmodel
from syncml_lib.costmodel import predict, predict_ps, ps_over_ring
from syncml_lib.mpirun import run_script

PARAMS = dict(alpha=1e-5, beta=1e-9, gamma=1e-10)


def test_the_ps_benchmark_prints_a_row_per_configuration():
    proc = run_script(["-m", "syncml_lib.bench", "ps", "--size", "10000", "--steps", "3", "--rounds", "2"], n=4, timeout=120)
    out = proc.stdout
    for config, workers, servers in [("1 server BSP", 3, 1), ("1 server ASP", 3, 1),
                                     ("2 servers BSP", 2, 2), ("2 servers ASP", 2, 2)]:
        rows = [line for line in out.splitlines() if line.strip().startswith(config + " |")]
        assert len(rows) == 1, out
        cells = [cell.strip() for cell in rows[0].split("|")]
        assert cells[1:3] == [str(workers), str(servers)], rows[0]
        assert cells[-1] == " + ".join([f"{2 * workers * 10000 // servers} B"] * servers), rows[0]
        assert f"{config}: measured" in out and "1.5x" in out
    assert "ring allreduce (same W)" in out and "MPI Allreduce" in out and "median over 2 runs" in out


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


def test_the_data_benchmark_prints_both_tables():
    proc = run_script(["-m", "syncml_lib.bench", "data", "--sizes", "8K", "64K", "--repeat", "5"], n=4, timeout=120)
    out = proc.stdout
    for header in ("MPI Scatterv | scatter_rows | Bcast + slice", "MPI Send + reply | kv put, R=1 | kv put, R=2 | kv get"):
        assert header in " ".join(out.split()), out   # columns are padded: compare with single spaces
    for size in ("8 KB", "64 KB"):
        rows = [line for line in out.splitlines() if line.strip().startswith(size + " |")]
        assert len(rows) == 2, out                                   # one in each table
        assert all(line.count("x)") == len(line.split("|")) - 1 for line in rows), rows
        assert all("(1.00x)" in line.split("|")[1] for line in rows), rows  # the first column is the reference


def test_the_tasks_benchmark_prints_a_row_per_task_time():
    proc = run_script(["-m", "syncml_lib.bench", "tasks", "--tasks", "12", "--repeat", "3"], n=3, timeout=120)
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.strip().startswith("12 |")]
    assert len(rows) == 2, out                                       # empty tasks, then 1 ms tasks
    assert all(line.count("x)") == 6 and "(1.00x)" in line.split("|")[2] for line in rows), rows
    assert "per hand-out" in out
