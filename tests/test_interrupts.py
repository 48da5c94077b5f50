"""Interrupting a run on the notebook's MPI engines, as a learner does: every rank stops within seconds,
and the next run in the same engines is correct.

The runs: run_parameter_server, run_kvstore, run_tasks, chapter 01's run_shared_updates,
run_barrier_steps and run_clocked_workers (rpc.Run ends them), chapter 06's train
(which stops every rank at the same step) and chapter 07's measure_step (two ranks train, two wait). What JupyterLab's interrupt of a %%px cell does: ipyparallel sends SIGINT to every engine (through each
engine's nanny), and every engine raises KeyboardInterrupt wherever it is. Here: start a run of about
10 s on 4 engines, send SIGINT to every engine after 1.5 s, wait at most a few seconds for every engine
to come back, then run a short job on the same engines and compare it with the answer computed here.
"""
import signal
import time

import numpy as np
import pytest

from syncml_lib.cluster import mpi_cluster

INTERRUPT_AFTER = 1.5  # seconds into a run of about 10 s
ENDS_WITHIN = 8.0      # seconds after the interrupt by which every engine must have come back


def outcome(fn, *args):
    """fn(*args) on this engine: ("ok", its value), or the exception's type and text, with the time."""
    def on_engine(*args):
        import time

        started = time.monotonic()
        try:
            value = fn(*args)
            return "ok", value, time.monotonic() - started
        except (KeyboardInterrupt, RuntimeError) as error:
            return type(error).__name__, str(error), time.monotonic() - started
    return on_engine


# ----------------------------------------------------------------------------- the three runs

def parameter_server(steps, sleep):
    from mpi4py import MPI

    from syncml_lib.parameter_server import run_parameter_server

    def grad(params, worker, step):
        time.sleep(sleep)
        return {"w": params["w"] - (worker + 1)}  # pulls w towards the mean target, 2 for 3 workers

    result = run_parameter_server(MPI.COMM_WORLD, {"w": np.zeros(5)}, grad, steps=steps, lr=0.5, mode="bsp")
    return result.params["w"].tolist()


def expected_parameter_server(steps, n_workers=3, lr=0.5):
    w = np.zeros(5)
    for _ in range(steps):
        w = w - lr * np.mean([w - (k + 1) for k in range(n_workers)], axis=0)
    return w.tolist()


def kvstore(rounds, sleep):
    from mpi4py import MPI

    from syncml_lib.kvstore import run_kvstore

    def client(store):
        for r in range(rounds):
            store.put(f"c{store.index}-{r}", np.full(3, float(r)))
            time.sleep(sleep)
        return [store.get(f"c{store.index}-{r}").tolist() for r in range(rounds)]

    return run_kvstore(MPI.COMM_WORLD, client, n_servers=2, replicas=2).returns


def tasks(n_tasks, sleep):
    from mpi4py import MPI

    from syncml_lib.scheduler import run_tasks

    def square(task):
        time.sleep(sleep)
        return task * task

    return run_tasks(MPI.COMM_WORLD, list(range(n_tasks)), square, schedule="dynamic").results


def training(epochs):
    from mpi4py import MPI

    from syncml_lib.training import train
    from syncml_lib.training.loop import flatten

    return flatten(train(MPI.COMM_WORLD, "allreduce", epochs=epochs, batch_size=32, lr=0.2).params).tolist()


def expected_training(epochs):
    from syncml_lib.training import train
    from syncml_lib.training.loop import flatten

    return flatten(train(None, "sequential", epochs=epochs, batch_size=32, lr=0.2).params).tolist()


def shared_updates(rounds, think):
    from mpi4py import MPI

    from syncml_lib.shared_value import run_shared_updates

    return run_shared_updates(MPI.COMM_WORLD, "cas", rounds=rounds, think=think).value.tolist()


def barrier_steps(steps, delay):
    from mpi4py import MPI

    from syncml_lib.barrier import run_barrier_steps

    return run_barrier_steps(MPI.COMM_WORLD, [delay * (MPI.COMM_WORLD.rank + 1)] * steps).delays.tolist()


def clocked_workers(iterations, delay):
    from mpi4py import MPI

    from syncml_lib.consistency import run_clocked_workers

    run = run_clocked_workers(MPI.COMM_WORLD, [delay] * iterations, staleness=1)
    return sorted((row["rank"], row["iteration"]) for row in run.iterations)


def scaling_step(epochs, batch_size):
    """Chapter 07's measure_step: ranks 0 and 1 train while ranks 2 and 3 wait asleep."""
    from mpi4py import MPI

    from syncml_lib.scaling import measure_step
    from syncml_lib.training import get_model

    row = measure_step(MPI.COMM_WORLD, 2, model=get_model("mlp"), batch_size=batch_size, epochs=epochs, rounds=1)
    return [row["ranks"], row["batch"], row["steps"]]


RUNS = {  # long run (about 10 s), short run, what the short run must return on every rank (a callable: computed
    # when the test needs it, not when an engine imports this module to unpickle a run)
    "run_parameter_server": (lambda: parameter_server(200, 0.05), lambda: parameter_server(5, 0),
                             expected_parameter_server(5)),
    "run_kvstore": (lambda: kvstore(1000, 0.01), lambda: kvstore(4, 0),
                    [[[float(r)] * 3 for r in range(4)] for _ in range(2)]),
    "run_tasks": (lambda: tasks(900, 0.03), lambda: tasks(20, 0), [t * t for t in range(20)]),
    "train": (lambda: training(200), lambda: training(1), lambda: expected_training(1)),
    "run_shared_updates": (lambda: shared_updates(2000, 0.005), lambda: shared_updates(5, 0), [5.0] * 3),
    "run_barrier_steps": (lambda: barrier_steps(300, 0.01), lambda: barrier_steps(3, 0),
                          [[0.0] * 3 for _ in range(4)]),
    "run_clocked_workers": (lambda: clocked_workers(300, 0.03), lambda: clocked_workers(3, 0),
                            [(r, t) for r in range(4) for t in range(3)]),
    "measure_step": (lambda: scaling_step(2000, 32), lambda: scaling_step(1, 64), [2, 64, 1437 // 64 - 2]),
}


@pytest.fixture(scope="module")
def view():
    with mpi_cluster(n=4, timeout=90) as view:
        # the engines import this module (to unpickle the runs) before the first run: a run that is
        # still being unpickled when the interrupt comes would raise outside outcome()
        view.apply_sync(outcome(time.monotonic))
        yield view


@pytest.mark.parametrize("name", RUNS)
def test_an_interrupt_ends_the_run_on_every_engine_and_the_next_run_is_right(view, name):
    long_run, short_run, expected = RUNS[name]
    running = view.apply_async(outcome(long_run))
    time.sleep(INTERRUPT_AFTER)
    assert not running.ready(), "the long run ended before the interrupt: make it longer"
    view.client.send_signal(signal.SIGINT, targets=view.targets, block=True)
    interrupted = time.monotonic()
    running.wait(ENDS_WITHIN)
    assert running.ready(), f"{name}: engines still running {ENDS_WITHIN} s after the interrupt"
    took = time.monotonic() - interrupted
    reports = running.get()
    kinds = [kind for kind, _, _ in reports]
    for kind, message, _ in reports:  # a rank the signal did not reach first hears which rank ended the run
        assert kind == "KeyboardInterrupt" or (kind == "RunAborted" and "interrupted" in message), reports
    print(f"{name}: every engine back {took:.2f} s after the interrupt: {kinds}")

    after = view.apply_async(outcome(short_run))
    after.wait(30)
    assert after.ready(), f"{name}: the next run on the same engines did not finish within 30 s"
    for kind, value, _ in after.get():
        assert kind == "ok", value
        np.testing.assert_allclose(value, expected() if callable(expected) else expected, rtol=1e-12, atol=1e-10)
