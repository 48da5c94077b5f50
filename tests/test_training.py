"""training/: chapter 06's trainers under real mpiexec against the single-process reference.

The reference is computed here, in the test process, with train(None, "sequential"), itself checked
against a plain numpy loop written below. Batches of 31 and 61 examples divide by none of 2..5 ranks,
so the shards are unequal. One mpiexec job per rank count runs every mechanism and returns the final
parameters; the tests compare them. Accuracy is measured, never timing.
"""
import numpy as np
import pytest

from syncml_lib.allreduce import ALGORITHMS
from syncml_lib.mpirun import run
from syncml_lib.training import MLP, assign_buckets, get_model, load_digits_split, time_to_accuracy, train
from syncml_lib.training.digits import epoch_sampler, global_batches, shard_of

EQUAL = dict(epochs=1, batch_size=61, lr=0.2)  # 23 steps of 61 examples: shards of 12-13 (5 ranks) .. 30-31
ACCURATE = dict(model="mlp", epochs=4, batch_size=32, lr=0.2)  # what every variant must reach 0.95 with


def max_error(got, expected):
    assert list(got) == list(expected)
    return max(float(np.max(np.abs(got[name] - expected[name]))) for name in expected)


# ----------------------------------------------------------------------------- in one process

def test_the_data_is_split_and_scaled_once():
    X_train, y_train, X_test, y_test = load_digits_split()
    assert X_train.shape == (1437, 64) and X_test.shape == (360, 64) and X_train.dtype == np.float64
    assert sorted(set(y_train)) == list(range(10)) and len(y_train) == 1437 and len(y_test) == 360
    assert np.allclose(X_train.mean(axis=0), 0) and np.allclose(X_train.std(axis=0)[X_train.std(axis=0) > 0], 1)
    assert load_digits_split()[0] is X_train                      # loaded once per process


def test_backward_gives_the_numerical_gradient_last_layer_first():
    model = MLP((64, 7, 10))
    params = model.init(seed=3)
    X, y = load_digits_split()[0][:9], load_digits_split()[1][:9]
    layers = list(model.backward(params, model.forward(params, X), y))
    assert [layer for layer, _ in layers] == [1, 0] and list(layers[0][1]) == ["W2", "b2"]
    grads = {name: g for _, layer in layers for name, g in layer.items()}
    rng = np.random.default_rng(0)
    for name in params:
        for _ in range(4):
            index = tuple(rng.integers(s) for s in params[name].shape)
            bumped = [{**params, name: params[name].copy()} for _ in range(2)]
            bumped[0][name][index] += 1e-6
            bumped[1][name][index] -= 1e-6
            numeric = (model.loss(model.forward(bumped[0], X), y) - model.loss(model.forward(bumped[1], X), y)) / 2e-6
            assert grads[name][index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, index)


def test_same_seed_same_parameters_and_softmax_is_a_network_without_hidden_layer():
    a, b = get_model("mlp").init(0), get_model("mlp").init(0)
    assert all(np.array_equal(a[name], b[name]) for name in a) and a["W1"].shape == (64, 128)
    assert not np.array_equal(a["W1"], get_model("mlp").init(1)["W1"])
    assert {name: p.shape for name, p in get_model("softmax").init(0).items()} == {"W1": (64, 10), "b1": (10,)}


def test_global_batches_reshuffle_every_epoch_and_split_in_blocks():
    sampler = epoch_sampler(100, seed=5)
    epoch0, epoch1 = global_batches(sampler, 0, 30), global_batches(sampler, 1, 30)
    assert [len(b) for b in epoch0] == [30, 30, 30]               # the last 10 are dropped
    assert len(set(np.concatenate(epoch0))) == 90                 # no example twice in an epoch
    assert not np.array_equal(epoch0[0], epoch1[0])               # set_epoch: a new shuffle
    assert np.array_equal(global_batches(epoch_sampler(100, seed=5), 0, 30)[2], epoch0[2])
    shards = [shard_of(epoch0[0], 4, r) for r in range(4)]
    assert [len(s) for s in shards] == [8, 8, 7, 7] and np.array_equal(np.concatenate(shards), epoch0[0])


@pytest.mark.parametrize("sizes, cap, expected", [
    ([10, 20, 30], None, [[0, 1, 2]]),                            # one bucket for everything
    ([10, 20, 30], 0, [[0], [1], [2]]),                           # one bucket per layer
    ([10, 20, 30], 30, [[0, 1], [2]]),                            # 10 + 20 fits exactly; 30 would not
    ([10, 50, 5, 5, 40], 20, [[0], [1], [2, 3], [4]]),            # a layer over the cap: a bucket of its own
    ([8], 4, [[0]]),
    ([], 100, []),
])
def test_assign_buckets(sizes, cap, expected):
    assert assign_buckets(sizes, cap) == expected


def plain_sgd(epochs, batch_size, lr, seed=0):
    """The reference written out: params -= lr * mean gradient of each global batch."""
    model, (X, y, _, _) = get_model("mlp"), load_digits_split()
    params, sampler = model.init(seed), epoch_sampler(len(y), seed)
    for epoch in range(epochs):
        for batch in global_batches(sampler, epoch, batch_size):
            activations = model.forward(params, X[batch])
            grads = {name: g for _, layer in model.backward(params, activations, y[batch]) for name, g in layer.items()}
            params = {name: params[name] - lr * grads[name] for name in params}
    return params


def test_the_sequential_trainer_is_plain_sgd_and_records_every_step():
    result = train(None, "sequential", **EQUAL)
    assert max_error(result.params, plain_sgd(**EQUAL)) == 0.0
    assert [row["step"] for row in result.history] == list(range(1437 // 61))
    assert all(row["loss"] == row["local_loss"] and row["examples"] == 61 and row["bytes_sent"] == 0
               for row in result.history)
    assert [e["epoch"] for e in result.evaluations] == [0]
    assert result.test_accuracy == result.evaluations[0]["test_accuracy"]
    assert time_to_accuracy(result, 0.0) == result.evaluations[0]["time"] and time_to_accuracy(result, 1.01) is None


class WrongShape(MLP):
    """The MLP, but W2's gradient comes back transposed on the ranks in bad_ranks (all if None)."""

    def __init__(self, bad_ranks=None):
        super().__init__((64, 16, 10), name="wrong shape")
        self.bad_ranks = bad_ranks

    def backward(self, params, activations, y):
        from mpi4py import MPI

        for layer, grads in super().backward(params, activations, y):
            if layer == 1 and (self.bad_ranks is None or MPI.COMM_WORLD.rank in self.bad_ranks):
                grads["W2"] = grads["W2"].T
            yield layer, grads


class InterruptedOnRank(MLP):
    """The MLP, but rank `rank` gets a SIGINT (Ctrl-C) during its forward pass of step `step`."""

    def __init__(self, rank, step):
        super().__init__((64, 16, 10), name="interrupted")
        self.rank, self.step, self.calls = rank, step, 0

    def forward(self, params, X):
        import os
        import signal

        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == self.rank and self.calls == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        self.calls += 1
        return super().forward(params, X)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(mechanism="gossip"), ValueError, "unknown mechanism 'gossip'"),
    (dict(H=4), ValueError, "'sequential' has no option 'H'"),
    (dict(epochs=0), ValueError, "epochs must be a positive integer"),
    (dict(batch_size=2000), ValueError, "batch_size must be an integer from 1 to 1437"),
    (dict(lr=-1), ValueError, "lr must be a positive number"),
    (dict(model="resnet"), ValueError, "unknown model 'resnet'"),
    (dict(model=object()), TypeError, "has no name, layers"),
    (dict(model=WrongShape()), ValueError, r"step 0: rank 0: gradient 'W2' has shape \(10, 16\)"),
    (dict(lr=1e100), FloatingPointError, "not finite at step"),
    (dict(mechanism="allreduce"), ValueError, "'allreduce' needs a communicator"),
])
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")  # diverging
def test_bad_input_in_one_process(kwargs, error, message):
    args = dict(mechanism="sequential", epochs=1, batch_size=100, lr=0.1) | kwargs
    with pytest.raises(error, match=message):
        train(None, args.pop("mechanism"), **args)


# ----------------------------------------------------------------------------- every mechanism, every rank count

def every_mechanism(comm, batch_size):
    """Final parameters (by name of the run) of every mechanism, with EQUAL's epochs and lr."""
    from syncml_lib.training import train

    runs = {algorithm: ("allreduce", dict(algorithm=algorithm)) for algorithm in ALGORITHMS}
    runs["local sgd H=1"] = ("local_sgd", dict(H=1))
    if comm.size > 1:                                              # a server and a worker
        runs["ps bsp"] = ("ps", {})
    if comm.size > 2:
        runs["ps bsp, 2 servers"] = ("ps", dict(n_servers=2))
    runs |= {f"bucketed {cap} overlap={overlap}": ("bucketed", dict(bucket_bytes=cap, overlap=overlap))
             for cap in (0, 16 << 10, None) for overlap in (True, False)}
    args = dict(EQUAL, batch_size=batch_size)
    results = {name: train(comm, mechanism, **args, **options) for name, (mechanism, options) in runs.items()}
    ring = results["ring"]
    return {"params": {name: r.params for name, r in results.items()},
            "losses": [row["loss"] for row in ring.history],
            "bytes": [row["bytes_sent"] for row in ring.history],
            "local sgd bytes": [row["bytes_sent"] for row in results["local sgd H=1"].history]}


@pytest.fixture(scope="module")
def reference():
    return {b: train(None, "sequential", **dict(EQUAL, batch_size=b)) for b in (31, 61)}


@pytest.mark.parametrize("n, batch_size", [(1, 61), (2, 31), (3, 61), (4, 61), (5, 31)])
def test_every_mechanism_equals_the_single_process_run(n, batch_size, reference):
    everyone = run(every_mechanism, n, batch_size, timeout=120)
    expected = reference[batch_size]
    mine = everyone[0]["params"]
    for name, params in mine.items():
        for rank in range(1, n):                                   # the replicas end equal
            assert max_error(everyone[rank]["params"][name], params) == 0.0, (name, rank)
        tolerance = 1e-12 if name.startswith("bucketed") else 1e-10
        assert max_error(params, expected.params) <= 1e-10, name   # = one process on the whole batch
        assert max_error(params, mine["ring"]) <= tolerance, name  # = un-bucketed allreduce data-parallel SGD
    losses = [row["loss"] for row in expected.history]
    assert np.allclose(everyone[0]["losses"], losses, rtol=1e-10) and everyone[n - 1]["losses"] == everyone[0]["losses"]

    # the ring sends 2 (p-1) chunks of the P parameters and the count (P + 1 floats) in all, per step
    n_params = sum(p.size for p in expected.params.values())
    for key, floats in (("bytes", n_params + 1), ("local sgd bytes", n_params)):
        per_step = np.sum([everyone[rank][key] for rank in range(n)], axis=0)
        assert set(per_step.tolist()) == {2 * (n - 1) * 8 * floats}, key


def with_replacements(comm):
    """Final parameters with each exercise function replaced on its module, as a checker does."""
    from syncml_lib.training import bucketing, data_parallel, local_sgd, train

    def unweighted(comm, grads, n_local, algorithm="ring"):           # the mean of the ranks' means
        return {name: comm.allreduce(grad) / comm.size for name, grad in grads.items()}

    def undivided(comm, grads, n_local, algorithm="ring"):            # the sum of the ranks' means
        return {name: comm.allreduce(grad) for name, grad in grads.items()}

    calls = []

    def per_layer(sizes, bucket_bytes):
        calls.append(list(sizes))
        return [[i] for i in range(len(sizes))]

    def keep_own(comm, params, algorithm="ring"):                      # no averaging at all
        return {name: value.copy() for name, value in params.items()}

    found = {}
    for module, name, replacement, mechanism, options in [
            (data_parallel, "weighted_average", unweighted, "allreduce", {}),
            (data_parallel, "weighted_average", undivided, "allreduce", {}),
            (local_sgd, "average_parameters", keep_own, "local_sgd", dict(H=1)),
            (bucketing, "assign_buckets", per_layer, "bucketed", dict(bucket_bytes=None))]:
        original = getattr(module, name)
        setattr(module, name, replacement)
        try:
            found[replacement.__name__] = train(comm, mechanism, **dict(EQUAL, batch_size=31), **options).params
        finally:
            setattr(module, name, original)
    return found, calls


def test_the_trainers_call_the_exercise_functions_by_name(reference):
    found, calls = run(with_replacements, 3, timeout=60)[1]
    expected = reference[31].params
    assert max_error(found["unweighted"], expected) > 1e-6           # 31 = 11 + 10 + 10: unequal shards
    assert max_error(found["undivided"], expected) > 1e-3            # lr times 3
    assert max_error(found["keep_own"], expected) > 1e-6             # replicas on their own shards
    assert max_error(found["per_layer"], expected) <= 1e-12 and calls == [[10 * 128 * 8 + 80, 64 * 128 * 8 + 1024]]


# ----------------------------------------------------------------------------- accuracy

def accuracy_of_every_variant(comm):
    from syncml_lib.training import train

    runs = {"allreduce": ("allreduce", {}), "ps bsp": ("ps", {}), "ps ssp": ("ps", dict(mode="ssp")),
            "ps asp": ("ps", dict(mode="asp")), "local sgd H=4": ("local_sgd", dict(H=4)),
            "local sgd H=16": ("local_sgd", dict(H=16)), "bucketed": ("bucketed", {})}
    return {name: [e["test_accuracy"] for e in train(comm, mechanism, **ACCURATE, **options).evaluations]
            for name, (mechanism, options) in runs.items()}


def test_every_variant_reaches_95_percent_and_ssp_asp_stay_near_bsp():
    accuracies = run(accuracy_of_every_variant, 4, timeout=120)[0]
    accuracies["sequential"] = [e["test_accuracy"] for e in train(None, "sequential", **ACCURATE).evaluations]
    for name, by_epoch in accuracies.items():
        assert len(by_epoch) == ACCURATE["epochs"] and by_epoch[-1] >= 0.95, (name, by_epoch)
    for mode in ("ssp", "asp"):
        assert abs(accuracies[f"ps {mode}"][-1] - accuracies["ps bsp"][-1]) <= 0.02, accuracies


# ----------------------------------------------------------------------------- backup workers

BACKUPS = dict(model="mlp", epochs=2, batch_size=32, lr=0.2)  # 44 steps an epoch, 88 in all
SLOW = 0.03  # seconds worker 0 (rank 1) sleeps before each gradient


def ps_with_a_slow_worker(comm):
    """The PS trainer (1 server, 3 workers) with one backup worker and without, worker 0 slowed down
    on its rank only (the trainer calls gradients_checked by module attribute); and train's errors
    for bad backups."""
    import time

    from syncml_lib.training import ps, train

    original = ps.gradients_checked

    def slowed(*args, **kwargs):
        time.sleep(SLOW)
        return original(*args, **kwargs)

    if comm.rank == 1:
        ps.gradients_checked = slowed
    try:
        results = {backups: train(comm, "ps", backups=backups, **BACKUPS) for backups in (1, 0)}
    finally:
        ps.gradients_checked = original

    def error_of(**options):
        try:
            train(comm, "ps", **BACKUPS, **options)
        except ValueError as error:
            return str(error)
        return None

    found = {backups: {"history": r.history, "evaluations": r.evaluations, "accuracy": r.test_accuracy,
                       "steps_per_epoch": r.steps_per_epoch} for backups, r in results.items()}
    found["errors"] = {"ssp": error_of(mode="ssp", backups=1), "too many": error_of(backups=3),
                       "negative": error_of(backups=-1), "not an int": error_of(backups=0.5)}
    return found


@pytest.fixture(scope="module")
def slow_worker_runs():
    return run(ps_with_a_slow_worker, 4, timeout=60)


def test_ps_with_a_backup_worker_leaves_the_slow_one_behind_and_still_learns(slow_worker_runs):
    reports = slow_worker_runs
    steps_per_epoch = reports[0][1]["steps_per_epoch"]
    steps = BACKUPS["epochs"] * steps_per_epoch
    for backups in (1, 0):
        for rank, report in enumerate(reports):
            result = report[backups]
            assert result["accuracy"] >= 0.85, (backups, result["accuracy"])
            history = result["history"]
            assert [row["step"] for row in history] == list(range(steps)), (backups, rank)
            assert all(np.isfinite(row["loss"]) for row in history)
            evaluations = result["evaluations"]  # one per epoch: at the first step worker 0 computed in the next
            assert [e["epoch"] for e in evaluations] == [0, 1] and evaluations[1]["step"] == steps
            assert steps_per_epoch <= evaluations[0]["step"] <= steps
            assert evaluations == reports[0][backups]["evaluations"]
            if backups == 0:
                assert evaluations[0]["step"] == steps_per_epoch
                assert rank == 0 or all(row["examples"] > 0 for row in history)
        # worker 0 (rank 1) skipped steps: empty rows; the fast workers computed every step
        skipped = [row for row in reports[1][backups]["history"] if row["examples"] == 0]
        assert (len(skipped) > 0) == (backups == 1)
        assert all(row["bytes_sent"] == 0 and row["compute"] == 0.0 for row in skipped)
        assert all(row["examples"] > 0 for rank in (2, 3) for row in reports[rank][backups]["history"])
    # the steps no longer wait for the slow worker (the server's rows: when each step was complete)
    with_backup, without = (np.array([row["time"] for row in reports[0][b]["history"]]) for b in (1, 0))
    assert with_backup[-1] < without[-1]
    assert np.median(np.diff(with_backup)) < np.median(np.diff(without)) / 2
    assert np.median(np.diff(without)) >= SLOW * 0.9


def test_ps_refuses_bad_backups_on_every_rank(slow_worker_runs):
    for report in slow_worker_runs:
        errors = report["errors"]
        assert errors["ssp"] == "train: backups=1 only applies to mode='bsp' (backup workers), not 'ssp'"
        assert errors["too many"] == ("train: backups=3 with 3 workers: a step needs the gradient of at least "
                                      "one worker, so backups must be at most 2")
        assert errors["negative"] == "train: backups must be a non-negative integer, got -1"
        assert errors["not an int"] == "train: backups must be a non-negative integer, got 0.5"


# ----------------------------------------------------------------------------- bad input: the same error on every rank

def bad_runs(comm):
    """The error each rank got for each bad run (or None if it trained)."""
    from syncml_lib.training import train

    def error_of(mechanism, **kwargs):
        try:
            train(comm, mechanism, **(dict(epochs=1, batch_size=60, lr=0.1) | kwargs))
        except Exception as error:  # noqa: BLE001
            return f"{type(error).__name__}: {error}"
        return None

    last = comm.size - 1
    return {
        "seed": error_of("allreduce", seed=7 if comm.rank == last else 0),
        "lr": error_of("allreduce", lr=0.2 if comm.rank == last else 0.1),
        "small batch": error_of("allreduce", batch_size=comm.size - 1),
        "small batch ps": error_of("ps", batch_size=comm.size - 2, n_servers=1),
        **{f"{mechanism} shape on rank {last}": error_of(mechanism, model=WrongShape(bad_ranks={last}), **options)
           for mechanism, options in (("allreduce", {}), ("bucketed", {}), ("local_sgd", dict(H=3)))},
        "bucketed shape everywhere": error_of("bucketed", model=WrongShape(), bucket_bytes=0),
        "ps shape": error_of("ps", model=WrongShape(bad_ranks={last})),
        "diverges": error_of("allreduce", lr=1e100),
        **{f"{mechanism} interrupted": error_of(mechanism, model=InterruptedOnRank(1, step=2), **options)
           for mechanism, options in (("allreduce", {}), ("bucketed", {}), ("local_sgd", dict(H=3)))},
        "clean afterwards": error_of("allreduce", epochs=1),
    }


def test_bad_input_or_ctrl_c_stops_every_rank_with_the_same_clear_error():
    n = 4
    reports = run(bad_runs, n, timeout=60)
    expected = {
        "seed": ["ValueError: train: seeds differ across ranks: 0 on ranks 0, 1, 2; 7 on rank 3",
                 "train: initial_parameters differ across ranks"],
        "lr": ["ValueError: train: lrs differ across ranks: 0.1 on ranks 0, 1, 2; 0.2 on rank 3"],
        "small batch": ["ValueError: train: batch_size 3 is smaller than the 4 ranks that compute"],
        "small batch ps": ["ValueError: train: batch_size 2 is smaller than the 3 workers that compute"],
        "allreduce shape on rank 3": ["ValueError: train: bad gradient at step 0: rank 3: gradient 'W2' has shape "
                                      "(10, 16), but the parameter has shape (16, 10)"],
        "bucketed shape on rank 3": ["bad gradient at step 0: rank 3: gradient 'W2' has shape (10, 16)"],
        "local_sgd shape on rank 3": ["bad gradient at step 2: rank 3: gradient 'W2' has shape"],  # the 1st average
        "bucketed shape everywhere": ["bad gradient at step 0: ranks 0, 1, 2, 3: gradient 'W2' has shape"],
        "ps shape": ["worker 2 failed at step 0: ValueError: gradient 'W2' has shape (10, 16)"],
        "diverges": ["FloatingPointError: train: the averaged gradient or parameters are not finite at step"],
        # noted during step 2, so the gradient of step 3 is NaN; local SGD's next average is after step 5
        "allreduce interrupted": ["RunAborted: train: rank 1 interrupted (KeyboardInterrupt) at step 3; "
                                  "the run was ended on every rank"],
        "bucketed interrupted": ["RunAborted: train: rank 1 interrupted (KeyboardInterrupt) at step 3"],
        "local_sgd interrupted": ["RunAborted: train: rank 1 interrupted (KeyboardInterrupt) at step 5"],
    }
    for case, parts in expected.items():
        for rank, report in enumerate(reports):
            assert report[case] is not None and all(part in report[case] for part in parts), (case, rank, report[case])
        assert len({report[case] for report in reports}) == 1, case  # the same words on every rank
    assert all(report["clean afterwards"] is None for report in reports)


def test_the_cached_split_is_scikit_learns_split(tmp_path, monkeypatch):
    """The split kept on disk is exactly what scikit-learn makes, and a broken cache file is made anew."""
    from syncml_lib.training import digits

    monkeypatch.setenv("SYNCML_CACHE", str(tmp_path))
    fresh = digits._split_with_sklearn()
    for attempt in ("no file yet", "from the file", "after the file was broken"):
        digits.load_digits_split.cache_clear()
        try:
            loaded = digits.load_digits_split()
        finally:
            digits.load_digits_split.cache_clear()
        assert digits.split_cache_file().exists(), attempt
        for mine, theirs in zip(loaded, fresh):
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), attempt
        digits.split_cache_file().write_bytes(b"not a npz file")
