"""parameter_server.py: ParameterStore in process; run_parameter_server under real mpiexec.

The reference for BSP is computed here with plain numpy. Stragglers are made with files, not
timing: worker 0 waits at step 0 until worker 1 has reached a given step, so the staleness that
ASP and SSP must show is certain, whatever the machine's load. One mpiexec job per rank count
runs all the cases of a kind and returns what it found; the tests read those reports.
"""
import functools
import re
import time
from pathlib import Path

import numpy as np
import pytest

from syncml_lib.mpirun import run
from syncml_lib.parameter_server import MODES, ParameterStore, check_gradients



RANKS_AND_SERVERS = [(p, s) for p in (2, 3, 4, 5) for s in (1, 2) if s < p]


# ----------------------------------------------------------------------------- problems to train on

W_TRUE = np.linspace(-1.0, 1.0, 6)


def batch(worker, step, rows=16):
    """A least-squares batch, different for every (worker, step)."""
    rng = np.random.default_rng([worker, step])
    x = rng.normal(size=(rows, W_TRUE.size))
    return x, x @ W_TRUE + 0.5 + 0.01 * rng.normal(size=rows)


def least_squares_grad(params, worker, step):
    """Gradient of 0.5 mean((x w + b - y)^2) on this worker's batch for this step."""
    x, y = batch(worker, step)
    residual = x @ params["w"] + params["b"] - y
    return {"w": x.T @ residual / len(y), "b": np.asarray(residual.mean())}


def loss(params):
    x, y = batch(999, 0, rows=256)
    return 0.5 * np.mean((x @ params["w"] + params["b"] - y) ** 2)


LEAST_SQUARES = {"w": np.zeros(W_TRUE.size), "b": np.asarray(0.0)}  # b is 0-d: one server's slice is empty
MIXED = {**LEAST_SQUARES, "m": np.arange(12.0).reshape(3, 4) / 10}


def mixed_grad(params, worker, step):
    """Least squares plus a 2-D parameter pulled towards a different target by each worker."""
    return {**least_squares_grad(params, worker, step), "m": params["m"] * (1 + step % 3) - worker}


def constant_grad(params, worker, step):
    """Gradients that do not depend on the parameters."""
    rng = np.random.default_rng([worker, step, 7])
    return {name: rng.normal(size=np.shape(value)) for name, value in params.items()}


def sequential(init, grad_fn, steps, lr, n_workers, optimizer="sgd", momentum=0.9):
    """What BSP must compute: params -= lr * mean over workers of grad_fn(params, w, t), t = 0, 1, ..."""
    params = {name: np.array(value, dtype=float) for name, value in init.items()}
    velocity = {name: np.zeros_like(value) for name, value in params.items()}
    for t in range(steps):
        grads = [grad_fn({k: v.copy() for k, v in params.items()}, w, t) for w in range(n_workers)]
        for name in params:
            update = np.mean([g[name] for g in grads], axis=0)
            if optimizer == "momentum":
                velocity[name] = momentum * velocity[name] + update
                update = velocity[name]
            params[name] = params[name] - lr * update
    return params


def assert_close(got, expected, rtol=1e-12):
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].shape == np.shape(expected[name]) and got[name].dtype == np.float64, name
        scale = max(1.0, float(np.max(np.abs(expected[name]), initial=0.0)))
        error = float(np.max(np.abs(got[name] - expected[name]), initial=0.0))
        assert error <= rtol * scale, f"{name}: off by {error:.3g} (scale {scale:.3g})"


def wait_for(flag, seconds=20):
    deadline = time.monotonic() + seconds
    while not flag.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{flag} never appeared")
        time.sleep(0.001)


def straggler(flag, release_step, grad_fn=least_squares_grad):
    """Worker 0 waits at step 0 until worker 1 has reached release_step."""
    def grad(params, worker, step):
        if worker == 1 and step == release_step:
            flag.touch()
        if worker == 0 and step == 0:
            wait_for(flag)
        return grad_fn(params, worker, step)
    return grad


def sleepy(params, worker, step):
    """A straggler by timing only: worker 0 is slower. Only bounds that must hold are checked."""
    if worker == 0:
        time.sleep(0.003)
    return least_squares_grad(params, worker, step)


def slim(result):
    return {"params": result.params, "history": result.history, "server_bytes": result.server_bytes,
            "start_step": result.start_step, "step_times": result.step_times, "dropped": result.dropped,
            "used": result.used}


# ----------------------------------------------------------------------------- ParameterStore, in process

def test_pull_returns_copies():
    init = {"w": np.arange(3.0)}
    store = ParameterStore(init, lr=0.1)
    init["w"][0] = 99  # the store made its own copy
    pulled = store.pull()
    pulled["w"][:] = -1
    assert np.array_equal(store.pull()["w"], [0.0, 1.0, 2.0])
    assert np.array_equal(store.pull("w")["w"], [0.0, 1.0, 2.0])
    assert list(store.pull(["w"])) == ["w"]


def test_sgd_and_momentum_updates_and_version():
    sgd = ParameterStore({"w": np.ones(2)}, lr=0.5)
    assert sgd.push({"w": np.array([1.0, 2.0])}) == 1
    assert np.array_equal(sgd.pull()["w"], [0.5, 0.0])

    store = ParameterStore({"w": np.zeros(2), "b": np.asarray(1.0)}, lr=0.1, optimizer="momentum", momentum=0.9)
    w, v = np.zeros(2), np.zeros(2)
    for g in ([1.0, 2.0], [0.5, -1.0], [0.0, 0.0]):
        store.push({"w": np.array(g)})  # b gets no gradient: it stays as it is
        v = 0.9 * v + np.array(g)
        w = w - 0.1 * v
    assert np.array_equal(store.pull()["w"], w) and store.pull()["b"] == 1.0
    assert store.version == 3


def test_unknown_names_raise_key_error_and_change_nothing():
    store = ParameterStore({"w": np.zeros(2), "b": np.asarray(0.0)}, lr=0.1)
    with pytest.raises(KeyError, match="'w2'"):
        store.push({"w": np.ones(2), "w2": np.ones(2)})
    with pytest.raises(KeyError, match="'w2'"):
        store.pull(["w2"])
    assert np.array_equal(store.pull()["w"], [0.0, 0.0]) and store.version == 0


@pytest.mark.parametrize("grad, match", [
    (np.ones(3), r"gradient 'w' has shape \(3,\), but the parameter has shape \(2,\)"),
    (np.ones((2, 1)), r"shape \(2, 1\)"),
    (np.ones(2, dtype=np.float32), "gradient 'w' has dtype float32, but the parameter has dtype float64"),
])
def test_wrong_shapes_and_dtypes_raise_value_error_and_change_nothing(grad, match):
    store = ParameterStore({"b": np.asarray(0.0), "w": np.zeros(2)}, lr=0.1, optimizer="momentum")
    with pytest.raises(ValueError, match=match):
        store.push({"b": np.asarray(1.0), "w": grad})  # b is fine and comes first: still not applied
    state = store.state()
    assert state["params"]["b"] == 0.0 and not np.any(state["velocity"]["b"]) and store.version == 0


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; valid optimizers are sgd, momentum"):
        ParameterStore({"w": np.zeros(2)}, lr=0.1, optimizer="adam")
    with pytest.raises(ValueError, match="floating point"):
        ParameterStore({"w": np.zeros(2, dtype=int)}, lr=0.1)
    with pytest.raises(TypeError, match="dict"):
        check_gradients([np.zeros(2)], {"w": ((2,), np.float64)})


def test_state_round_trips():
    store = ParameterStore({"w": np.zeros(2)}, lr=0.1, optimizer="momentum")
    store.push({"w": np.ones(2)})
    copy = ParameterStore({"w": np.zeros(2)}, lr=0.1, optimizer="momentum")
    copy.load_state(store.state())
    store.push({"w": np.ones(2)})
    copy.push({"w": np.ones(2)})
    assert np.array_equal(copy.pull()["w"], store.pull()["w"]) and copy.version == store.version == 2


# ----------------------------------------------------------------------------- the modes, over MPI

def modes_job(comm, flags):
    """Every mode on this rank count, with 1 and 2 servers where there is a worker left."""
    from syncml_lib.parameter_server import run_parameter_server as ps

    found = {}
    for n_servers in (1, 2):
        if n_servers >= comm.size:
            continue
        n_workers = comm.size - n_servers

        def go(name, init, grad_fn, **options):
            found[n_servers, name] = slim(ps(comm, init, grad_fn, n_servers=n_servers, **options))

        go("bsp", MIXED, mixed_grad, steps=6, lr=0.1)
        go("bsp momentum", MIXED, mixed_grad, steps=5, lr=0.05, optimizer="momentum", momentum=0.8)
        go("bsp constant", MIXED, constant_grad, steps=5, lr=0.1)
        go("ssp0 constant", MIXED, constant_grad, steps=5, lr=0.1, mode="ssp", staleness=0)
        go("ssp0", MIXED, mixed_grad, steps=6, lr=0.1, mode="ssp", staleness=0)
        go("asp", LEAST_SQUARES, least_squares_grad, steps=20, lr=0.2, mode="asp")
        go("asp momentum", LEAST_SQUARES, least_squares_grad, steps=20, lr=0.1, mode="asp", optimizer="momentum",
           momentum=0.5)
        if n_workers >= 2:
            flag = Path(flags) / f"p{comm.size}-s{n_servers}"
            for s in (1, 2):
                go(f"ssp{s} straggler", LEAST_SQUARES, straggler(flag.with_suffix(f".ssp{s}"), s),
                   steps=6, lr=0.1, mode="ssp", staleness=s)
            go("asp straggler", LEAST_SQUARES, straggler(flag.with_suffix(".asp"), 5), steps=6, lr=0.1, mode="asp")
            go("ssp1 sleepy", LEAST_SQUARES, sleepy, steps=8, lr=0.1, mode="ssp", staleness=1)
    return found


@functools.cache
def modes(p, tmp_dir):
    return run(modes_job, p, str(tmp_dir), timeout=60)


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    return tmp_path_factory.mktemp("flags")


def check_history(result, n_workers, steps, start=0):
    rows = result["history"]
    assert [(r["worker"], r["step"]) for r in rows] == [(w, t) for w in range(n_workers) for t in range(start, steps)]
    for r in rows:
        assert r["staleness"] == r["step"] - r["read_clock"] >= 0
        assert 0 <= r["start"] <= r["pulled"] <= r["end"]


@pytest.mark.parametrize("p, n_servers", RANKS_AND_SERVERS)
def test_bsp_equals_the_sequential_reference(p, n_servers, flags):
    n_workers = p - n_servers
    reports = modes(p, flags)
    for rank, found in enumerate(reports):
        bsp = found[n_servers, "bsp"]
        assert_close(bsp["params"], sequential(MIXED, mixed_grad, 6, 0.1, n_workers))
        momentum = found[n_servers, "bsp momentum"]
        assert_close(momentum["params"], sequential(MIXED, mixed_grad, 5, 0.05, n_workers, "momentum", 0.8))
        for name in MIXED:  # every rank has the very same result
            assert np.array_equal(bsp["params"][name], reports[0][n_servers, "bsp"]["params"][name])
    bsp = reports[0][n_servers, "bsp"]
    check_history(bsp, n_workers, 6)
    assert all(r["read_clock"] == r["step"] for r in bsp["history"])


@pytest.mark.parametrize("p, n_servers", RANKS_AND_SERVERS)
def test_each_server_moves_its_slice_per_worker_per_step(p, n_servers, flags):
    n_workers = p - n_servers
    bsp = modes(p, flags)[0][n_servers, "bsp"]
    for s, moved in enumerate(bsp["server_bytes"]):
        slice_bytes = sum(np.array_split(value.reshape(-1), n_servers)[s].nbytes for value in MIXED.values())
        assert moved == {"sent": 6 * n_workers * slice_bytes, "received": 6 * n_workers * slice_bytes}


@pytest.mark.parametrize("p, n_servers", RANKS_AND_SERVERS)
def test_ssp_with_staleness_0_keeps_bsps_guarantee(p, n_servers, flags):
    found = modes(p, flags)[0]
    n_workers = p - n_servers
    # the same updates, applied one push at a time: BSP's result up to rounding when gradients
    # do not depend on the parameters
    assert_close(found[n_servers, "ssp0 constant"]["params"], found[n_servers, "bsp constant"]["params"])
    for name in ("ssp0", "ssp0 constant"):
        check_history(found[n_servers, name], n_workers, found[n_servers, name]["history"][-1]["step"] + 1)
        assert all(r["read_clock"] == r["step"] for r in found[n_servers, name]["history"])


@pytest.mark.parametrize("p, n_servers", RANKS_AND_SERVERS)
def test_asp_converges_on_least_squares(p, n_servers, flags):
    found = modes(p, flags)[0]
    for name in ("asp", "asp momentum"):
        check_history(found[n_servers, name], p - n_servers, 20)
        assert loss(found[n_servers, name]["params"]) < 0.01 * loss(LEAST_SQUARES), name


@pytest.mark.parametrize("p, n_servers", [(p, s) for p, s in RANKS_AND_SERVERS if p - s >= 2])
def test_staleness_is_bounded_in_ssp_and_shows_in_asp(p, n_servers, flags):
    found = modes(p, flags)[0]
    n_workers = p - n_servers
    for s in (1, 2):
        result = found[n_servers, f"ssp{s} straggler"]
        check_history(result, n_workers, 6)
        # worker 1 reached step s while worker 0 had pushed nothing: exactly s behind, and no more
        assert max(r["staleness"] for r in result["history"]) == s
    sleepy = found[n_servers, "ssp1 sleepy"]
    check_history(sleepy, n_workers, 8)
    assert max(r["staleness"] for r in sleepy["history"]) <= 1
    asp = found[n_servers, "asp straggler"]
    check_history(asp, n_workers, 6)
    assert [r["staleness"] for r in asp["history"] if r["worker"] == 1] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("p, n_servers", RANKS_AND_SERVERS)
def test_without_backups_every_step_uses_every_worker_and_its_time_is_kept(p, n_servers, flags):
    n_workers = p - n_servers
    found = modes(p, flags)[0]
    for name, steps in (("bsp", 6), ("ssp0", 6), ("asp", 20)):
        result = found[n_servers, name]
        assert result["dropped"] == [0] * n_workers, name
        assert result["used"] == ([list(range(n_workers))] * steps if name == "bsp" else None), name
        times = result["step_times"]
        assert len(times) == steps and all(a < b for a, b in zip(times, times[1:])), name


# ----------------------------------------------------------------------------- backup workers, over MPI

TARGETS = np.arange(12.0).reshape(4, 3)  # worker w pulls the parameters towards TARGETS[w]


def towards_target(params, worker, step):
    """grad = params - target of the worker: the update depends on which workers are averaged."""
    return {"w": params["w"] - TARGETS[worker]}


def backups_job(comm, flags):
    """BSP with one backup worker: the last worker sleeps 0.2 s at every step, and also waits until
    every other worker has started the next step (so the step it computes has certainly been
    completed without it), except at the last step, where only the 0.2 s make it late."""
    from syncml_lib.parameter_server import run_parameter_server as ps

    found, steps = {}, 30
    for n_servers in (1, 2):
        n_workers = comm.size - n_servers
        slow = n_workers - 1
        flag = Path(flags) / f"s{n_servers}"

        def grad(params, worker, step):
            if worker == slow:
                time.sleep(0.2)
                if step + 1 < steps:
                    for other in range(slow):
                        wait_for(flag.with_suffix(f".w{other}.t{step + 1}"))
            else:
                flag.with_suffix(f".w{worker}.t{step}").touch()
                time.sleep(0.01)
            return towards_target(params, worker, step)

        found[n_servers] = slim(ps(comm, {"w": np.zeros(3)}, grad, steps=steps, lr=0.2, n_servers=n_servers,
                                   backups=1))

    def error_of(**options):
        try:
            ps(comm, {"w": np.zeros(3)}, towards_target, steps=3, lr=0.1, **options)
        except ValueError as error:
            return str(error)
        return None

    found["errors"] = {"ssp": error_of(mode="ssp", staleness=1, backups=1), "asp": error_of(mode="asp", backups=1),
                       "too many": error_of(backups=comm.size - 1), "negative": error_of(backups=-1),
                       "not an int": error_of(backups=1.0),
                       "differs": error_of(backups=1 if comm.rank == 0 else 0)}
    found["afterwards"] = ps(comm, {"w": np.zeros(3)}, towards_target, steps=4, lr=0.2, backups=0).params
    return found


def with_subsets(init, used, lr):
    """The sequential reference of a BSP run with backups: at step t, the mean over the workers in
    used[t] (summed in worker order, as a server does), all computed on the parameters after step t-1."""
    w = np.array(init, dtype=float)
    for t, workers in enumerate(used):
        grads = [towards_target({"w": w.copy()}, worker, t)["w"] for worker in workers]
        w = w - lr * (sum(grads) / len(grads))
    return w


@pytest.fixture(scope="module")
def backups(tmp_path_factory):
    return run(backups_job, 4, str(tmp_path_factory.mktemp("backup-flags")), timeout=60)


@pytest.mark.parametrize("n_servers", [1, 2])
def test_backup_workers_leave_the_slow_one_out_and_equal_the_reference_on_the_subsets(n_servers, backups):
    n_workers, steps = 4 - n_servers, 30
    slow = n_workers - 1
    result = backups[0][n_servers]
    assert result["used"] == [list(range(slow))] * steps          # W - 1 workers a step, never the slow one
    assert_close(result["params"], {"w": with_subsets(np.zeros(3), result["used"], 0.2)})
    assert result["dropped"][slow] > 0 and result["dropped"][:slow] == [0] * slow
    times = result["step_times"]
    assert len(times) == steps and all(a < b for a, b in zip(times, times[1:]))
    # the fast workers have a row for every step; the slow one for the few it computed, and no others
    rows = result["history"]
    for worker in range(slow):
        assert [r["step"] for r in rows if r["worker"] == worker] == list(range(steps))
    computed = [r["step"] for r in rows if r["worker"] == slow]
    assert computed[0] == 0 and computed == sorted(set(computed)) and len(computed) < steps / 2, computed
    # it computed each of them on the parameters of that step, and every one of its pushes came too late
    assert all(r["read_clock"] == r["step"] and r["staleness"] == 0 for r in rows)
    assert result["dropped"][slow] == len(computed) * n_servers
    for on_rank in backups:  # the run ended on every rank, with the same result
        assert np.array_equal(on_rank[n_servers]["params"]["w"], result["params"]["w"])
        assert on_rank[n_servers]["used"] == result["used"]


def test_bad_backups_raise_value_error_on_every_rank(backups):
    for on_rank in backups:
        errors = on_rank["errors"]
        assert errors["ssp"] == "backups=1 only applies to mode='bsp' (backup workers), not 'ssp'"
        assert errors["asp"] == "backups=1 only applies to mode='bsp' (backup workers), not 'asp'"
        assert errors["too many"] == ("backups=3 with 3 workers: a step needs the gradient of at least one "
                                      "worker, so backups must be at most 2")
        assert errors["negative"] == "backups must be a non-negative integer, got -1"
        assert errors["not an int"] == "backups must be a non-negative integer, got 1.0"
        assert "backups differ across ranks: 1 on rank 0; 0 on ranks 1, 2, 3" in errors["differs"]
        assert_close(on_rank["afterwards"], {"w": with_subsets(np.zeros(3), [[0, 1, 2]] * 4, 0.2)})


# ----------------------------------------------------------------------------- failures, over MPI

def failures_job(comm, n_servers):
    from syncml_lib.parameter_server import run_parameter_server as ps

    def fails_at(worker, step, make_grads):
        def grad(params, w, t):
            if (w, t) == (worker, step):
                return make_grads(params)
            return least_squares_grad(params, w, t)
        return grad

    def bad_batch(params):
        raise ValueError("bad batch")

    def interrupted(params):
        raise KeyboardInterrupt("stop")  # what interrupting a notebook cell raises on the engines

    cases = {
        "raises bsp": (fails_at(1, 3, bad_batch), {}),
        "raises ssp": (fails_at(1, 3, bad_batch), {"mode": "ssp", "staleness": 1}),
        "raises asp": (fails_at(1, 3, bad_batch), {"mode": "asp"}),
        "raises at once": (fails_at(0, 0, bad_batch), {}),
        "interrupted": (fails_at(2, 2, interrupted), {}),
        "unknown key": (fails_at(2, 1, lambda params: {**least_squares_grad(params, 2, 1), "w2": np.ones(2)}), {}),
        "wrong shape": (fails_at(0, 2, lambda params: {"w": np.ones(4), "b": np.asarray(0.0)}), {"mode": "asp"}),
        "missing": (fails_at(1, 0, lambda params: {"w": params["w"]}), {}),
        "not a dict": (fails_at(1, 1, lambda params: [params["w"]]), {}),
        "no worker": (least_squares_grad, {"n_servers": comm.size}),
        "unknown mode": (least_squares_grad, {"mode": "bssp"}),
        "staleness in bsp": (least_squares_grad, {"staleness": 2}),
    }
    found = {}
    for case, (grad_fn, options) in cases.items():
        options = {"n_servers": n_servers, **options}
        try:
            ps(comm, LEAST_SQUARES, grad_fn, steps=6, lr=0.1, **options)
            found[case] = None
        except (RuntimeError, ValueError, KeyboardInterrupt) as error:
            found[case] = (type(error).__name__, str(error))
    # afterwards the communicator is clean: a normal run still gives the right answer
    found["afterwards"] = ps(comm, LEAST_SQUARES, least_squares_grad, steps=3, lr=0.1, n_servers=n_servers).params
    return found


@functools.cache
def failures(p, n_servers):
    return run(failures_job, p, n_servers, timeout=60)


FAILURES = [(4, 1), (5, 2)]  # 3 workers each


@pytest.mark.parametrize("p, n_servers", FAILURES)
def test_a_raising_grad_fn_ends_the_run_on_every_rank(p, n_servers):
    for found in failures(p, n_servers):
        for case in ("raises bsp", "raises ssp", "raises asp"):
            assert found[case] == ("RunAborted", "worker 1 failed at step 3: ValueError: bad batch"), case
        assert found["raises at once"] == ("RunAborted", "worker 0 failed at step 0: ValueError: bad batch")
        assert_close(found["afterwards"], sequential(LEAST_SQUARES, least_squares_grad, 3, 0.1, 3))


@pytest.mark.parametrize("p, n_servers", FAILURES)
def test_an_interrupted_worker_ends_the_run_on_every_rank(p, n_servers):
    interrupted_rank = n_servers + 2  # worker 2
    for rank, found in enumerate(failures(p, n_servers)):
        if rank == interrupted_rank:
            assert found["interrupted"] == ("KeyboardInterrupt", "stop")
        else:
            assert found["interrupted"] == ("RunAborted", "worker 2 was interrupted at step 2 (KeyboardInterrupt); "
                                                          "the run was ended on every rank")
        assert_close(found["afterwards"], sequential(LEAST_SQUARES, least_squares_grad, 3, 0.1, 3))


@pytest.mark.parametrize("p, n_servers", FAILURES)
def test_bad_gradients_are_named_on_every_rank(p, n_servers):
    for found in failures(p, n_servers):
        kind, message = found["unknown key"]
        assert kind == "RunAborted" and message.startswith("worker 2 failed at step 1: KeyError:")
        assert "unknown parameter 'w2'" in message
        assert found["wrong shape"] == (
            "RunAborted", "worker 0 failed at step 2: ValueError: gradient 'w' has shape (4,), "
                            "but the parameter has shape (6,)")
        assert found["missing"] == ("RunAborted", "worker 1 failed at step 0: ValueError: "
                                                    "grad_fn returned no gradient for 'b'")
        kind, message = found["not a dict"]
        assert kind == "RunAborted" and message.startswith("worker 1 failed at step 1: TypeError:")


@pytest.mark.parametrize("p, n_servers", FAILURES)
def test_bad_arguments_raise_value_error_on_every_rank(p, n_servers):
    for found in failures(p, n_servers):
        assert found["no worker"][0] == "ValueError" and "leaves no worker" in found["no worker"][1]
        assert found["unknown mode"] == ("ValueError", "unknown mode 'bssp'; valid modes are bsp, ssp, asp")
        kind, message = found["staleness in bsp"]
        assert kind == "ValueError" and "only applies to mode='ssp'" in message


def failing_checkpoint_job(comm, directory, n_servers):
    """Worker 0 deletes the checkpoint folder at step 3, so a server's next checkpoint write fails
    after it has acknowledged the push that completes the step."""
    import shutil

    from syncml_lib.parameter_server import run_parameter_server as ps

    def grad(params, worker, step):
        if (worker, step) == (0, 3):
            shutil.rmtree(directory, ignore_errors=True)
        return least_squares_grad(params, worker, step)

    found = {}
    try:
        ps(comm, LEAST_SQUARES, grad, steps=8, lr=0.1, n_servers=n_servers, checkpoint_dir=directory,
           checkpoint_every=1)
        found["failed"] = None
    except RuntimeError as error:
        found["failed"] = (type(error).__name__, str(error))
    found["afterwards"] = ps(comm, LEAST_SQUARES, least_squares_grad, steps=3, lr=0.1, n_servers=n_servers).params
    return found


@pytest.mark.parametrize("p, n_servers", FAILURES)
def test_a_server_failing_after_its_acknowledgement_ends_the_run_on_every_rank(p, n_servers, tmp_path):
    """The push was answered once already: the failure must not become a second reply (which would put
    every later reply to that worker one off), but end the run everywhere, with the server's error."""
    for found in run(failing_checkpoint_job, p, str(tmp_path / "gone"), n_servers, timeout=60):
        kind, message = found["failed"]
        assert kind == "RunAborted" and re.match(r"server \d: FileNotFoundError: ", message), message
        assert_close(found["afterwards"], sequential(LEAST_SQUARES, least_squares_grad, 3, 0.1, p - n_servers))


def one_gradient(params, worker, step):
    """The same gradient for every worker at every step: in whatever order a server gets the pushes
    (ASP lets a fast worker run steps ahead), the sequence of gradients it applies is the same."""
    return constant_grad(params, 0, 0)


def momentum_job(comm, n_servers, steps, lr, momentum):
    from syncml_lib.parameter_server import run_parameter_server as ps

    common = dict(steps=steps, lr=lr, optimizer="momentum", momentum=momentum, n_servers=n_servers)
    return {mode: ps(comm, MIXED, one_gradient, mode=mode, **common).params for mode in MODES}


def per_push_momentum(init, steps, lr, momentum, n_workers):
    """SSP's and ASP's momentum as the docstring states it: every push is a momentum step with lr / W."""
    params = {name: np.array(value, dtype=float) for name, value in init.items()}
    velocity = {name: np.zeros_like(value) for name, value in params.items()}
    for t in range(steps):
        grad = one_gradient(params, 0, t)
        for _ in range(n_workers):
            for name in params:
                velocity[name] = momentum * velocity[name] + grad[name]
                params[name] = params[name] - lr / n_workers * velocity[name]
    return params


@pytest.mark.parametrize("p, n_servers", [(4, 1), (5, 2)])
def test_momentum_in_ssp_and_asp_is_per_push_not_bsp_momentum(p, n_servers):
    n_workers, steps, lr, m = p - n_servers, 6, 0.05, 0.9
    found = run(momentum_job, p, n_servers, steps, lr, m, timeout=60)[0]
    bsp_reference = sequential(MIXED, one_gradient, steps, lr, n_workers, "momentum", m)
    assert_close(found["bsp"], bsp_reference)
    per_push = per_push_momentum(MIXED, steps, lr, m, n_workers)
    assert_close(found["ssp"], per_push)   # staleness 0: BSP's reads, and still not BSP's momentum
    assert_close(found["asp"], per_push)
    gap = max(float(np.max(np.abs(per_push[name] - bsp_reference[name]))) for name in MIXED)
    assert gap > 1e-3, f"per-push and BSP momentum should differ visibly here, differ by {gap:.2g}"


# ----------------------------------------------------------------------------- checkpoints, over MPI

def checkpoint_job(comm, directory, n_servers):
    from syncml_lib.parameter_server import run_parameter_server as ps

    every2, every4, empty = (Path(directory) / name for name in ("every2", "every4", "empty"))
    common = dict(lr=0.05, optimizer="momentum", n_servers=n_servers)  # momentum: velocities are saved too
    found = {"uninterrupted": slim(ps(comm, MIXED, mixed_grad, steps=10, **common))}
    found["stopped at 6"] = slim(ps(comm, MIXED, mixed_grad, steps=6, checkpoint_dir=every2, checkpoint_every=2,
                                    **common))
    comm.Barrier()
    found["files after 6"] = sorted(path.name for path in every2.iterdir())
    found["resumed to 10"] = slim(ps(comm, MIXED, mixed_grad, steps=10, checkpoint_dir=every2, checkpoint_every=2,
                                     resume=True, **common))
    found["resumed again"] = slim(ps(comm, MIXED, mixed_grad, steps=10, checkpoint_dir=every2, resume=True, **common))
    try:
        ps(comm, MIXED, mixed_grad, steps=10, checkpoint_dir=every2, resume=True, **{**common, "optimizer": "sgd"})
    except ValueError as error:
        found["resumed with another optimizer"] = str(error)
    ps(comm, MIXED, mixed_grad, steps=6, checkpoint_dir=every4, checkpoint_every=4, **common)
    found["resumed from 4"] = slim(ps(comm, MIXED, mixed_grad, steps=10, checkpoint_dir=every4, resume=True, **common))
    found["nothing to resume"] = slim(ps(comm, MIXED, mixed_grad, steps=3, checkpoint_dir=empty, resume=True, **common))
    ps(comm, MIXED, mixed_grad, steps=3, checkpoint_dir=every2, checkpoint_every=2, **common)  # a fresh run
    comm.Barrier()
    found["files after a fresh run"] = sorted(path.name for path in every2.iterdir())
    return found


@functools.cache
def checkpoints(p, n_servers, tmp_dir):
    return run(checkpoint_job, p, tmp_dir, n_servers, timeout=60)


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.mark.parametrize("p, n_servers", [(3, 1), (4, 2)])
def test_checkpoint_resume_equals_an_uninterrupted_run(p, n_servers, checkpoint_root):
    n_workers = p - n_servers
    found = checkpoints(p, n_servers, str(checkpoint_root / f"p{p}"))[0]
    uninterrupted = found["uninterrupted"]["params"]
    assert_close(uninterrupted, sequential(MIXED, mixed_grad, 10, 0.05, n_workers, "momentum"))
    for case, start in (("resumed to 10", 6), ("resumed again", 10), ("resumed from 4", 4)):
        result = found[case]
        assert result["start_step"] == start, case
        check_history(result, n_workers, 10, start=start)
        for name in MIXED:
            assert np.array_equal(result["params"][name], uninterrupted[name]), (case, name)
    assert found["nothing to resume"]["start_step"] == 0
    for on_rank in checkpoints(p, n_servers, str(checkpoint_root / f"p{p}")):
        message = on_rank["resumed with another optimizer"]
        assert message.startswith("server 0 cannot resume from step 10: ValueError:")
        assert "velocity" in message and "optimizer 'sgd'" in message


@pytest.mark.parametrize("p, n_servers", [(3, 1), (4, 2)])
def test_checkpoints_keep_the_two_newest_and_a_fresh_run_starts_over(p, n_servers, checkpoint_root):
    found = checkpoints(p, n_servers, str(checkpoint_root / f"p{p}"))[0]
    assert found["files after 6"] == sorted(f"server{s}-step{t}.npz" for s in range(n_servers) for t in (4, 6))
    assert found["files after a fresh run"] == [f"server{s}-step2.npz" for s in range(n_servers)]
