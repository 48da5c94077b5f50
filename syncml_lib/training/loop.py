"""What every trainer shares: a shard's gradient checked layer by layer, stopping every rank together,
and the record of a run (one history row per step, one evaluation per epoch).

A bad gradient on one rank must not leave the others waiting inside an allreduce. So no rank
raises in the middle of a step: a gradient that is missing, of the wrong shape or dtype, or whose
model raised, is replaced by NaN of the parameter's shape and the rank notes the problem. A NaN
anywhere makes the sum NaN on every rank, so after the reduction every rank sees it at the same
step, and only then do they spend one allgather to say who had which problem, and all raise the
same error. When no rank had a problem, the reduced values are finite and nothing more is sent.
A run that diverges (lr too large) stops the same way, with FloatingPointError.

Ctrl-C (a notebook's interrupt, SIGINT to every engine) is handled the same way: during a run it only
marks the rank interrupted (interrupts_noted), and the rank's next gradient is NaN, so every rank
stops at the same step with RunAborted(..., interrupted=True) instead of some of them leaving while
the others wait for them inside MPI.
"""
import hashlib
import time

import numpy as np

from ..parameter_server import check_gradients
from ..rpc import RunAborted, interrupts_noted, wait_sleeping
from . import digits

__all__ = ["Job", "Record", "one_blas_thread", "interrupts_noted", "INTERRUPTED", "forward_checked",
           "backward_checked", "gradients_checked", "stop_together", "raise_problems", "fingerprint", "params_specs",
           "flatten", "unflatten"]


def params_specs(params):
    return {name: (value.shape, value.dtype) for name, value in params.items()}


def fingerprint(arrays):
    """A short hash of a dict of arrays (names, shapes, dtypes, bytes): equal on two ranks iff they hold the same."""
    digest = hashlib.blake2b(digest_size=8)
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        digest.update(f"{name}{value.shape}{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def flatten(arrays):
    """One new flat float64 vector of all the arrays of a dict, in its order."""
    return np.concatenate([np.ravel(value) for value in arrays.values()])


def unflatten(flat, like):
    """A dict shaped like `like` (name -> array) whose arrays are consecutive pieces (views) of flat."""
    pieces, start = {}, 0
    for name, value in like.items():
        pieces[name] = flat[start:start + np.size(value)].reshape(np.shape(value))
        start += np.size(value)
    return pieces


# ----------------------------------------------------------------------------- running on every rank at once

def one_blas_thread():
    """A context manager: numpy's BLAS limited to one thread while it runs. The ranks already take the
    cores, one process each; BLAS threads on top of them oversubscribe the cores (measured: an epoch of
    an MLP 64-256-256-256-10 on 4 ranks of a 2-core machine, 4.6 s with OpenBLAS's 2 threads per rank,
    0.24 s with 1). threadpoolctl comes with scikit-learn."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


INTERRUPTED = "interrupted (KeyboardInterrupt)"


# ----------------------------------------------------------------------------- one shard's gradient, checked

def _nan_like(params, names):
    return {name: np.full_like(params[name], np.nan) for name in names}


def forward_checked(model, params, X, y, problem=None):
    """(activations, loss, problem): problem is None, or the text of what the model raised.
    Given a problem already (the rank was interrupted), the model is not run."""
    if problem is not None:
        return None, float("nan"), problem
    try:
        activations = model.forward(params, X)
        return activations, model.loss(activations, y), None
    except Exception as error:  # noqa: BLE001 - reported on every rank by stop_together
        return None, float("nan"), f"the model's forward pass raised {type(error).__name__}: {error}"


def _layer_problem(layer, names, got_layer, grads, specs):
    """What is wrong with what the backward pass gave for `layer` (None if nothing)."""
    if got_layer != layer:
        return f"the backward pass gave layer {got_layer} where layer {layer} was due (the last layer first)"
    try:
        check_gradients(grads, specs)
    except (TypeError, KeyError, ValueError) as error:
        return str(error).strip("\"'")
    if sorted(grads) != sorted(names):
        return f"layer {layer} must give gradients for {', '.join(names)}, got {', '.join(map(repr, grads))}"
    return None


def backward_checked(model, params, activations, y, problem=None):
    """Yield (layer, grads, problem) for every layer, last first, whatever model.backward does.

    grads holds a gradient for each parameter of the layer, of its shape and dtype: the model's, or
    NaN if the model's was wrong or missing or it raised (problem then says what happened; once a
    layer fails, the layers below it are NaN too)."""
    specs = params_specs(params)
    produced = model.backward(params, activations, y) if problem is None else iter(())
    for layer in reversed(range(len(model.layers))):
        names = model.layers[layer]
        if problem is None:
            try:
                got_layer, grads = next(produced)
            except StopIteration:
                problem = f"the backward pass ended before layer {layer}"
            except Exception as error:  # noqa: BLE001
                problem = f"the backward pass raised {type(error).__name__}: {error}"
            else:
                problem = _layer_problem(layer, names, got_layer, grads, specs)
        yield layer, (_nan_like(params, names) if problem else grads), problem


def gradients_checked(model, params, X, y, problem=None):
    """(loss, grads, problem) of one shard: the whole backward pass, checked (see backward_checked)."""
    activations, loss, problem = forward_checked(model, params, X, y, problem)
    grads = {}
    for _, layer_grads, problem in backward_checked(model, params, activations, y, problem):
        grads.update(layer_grads)
    return loss, {name: grads[name] for name in params}, problem


# ----------------------------------------------------------------------------- stopping together

def raise_problems(problems, step):
    """Raise the error for problems[rank] (None: that rank had none), grouping the ranks that had the
    same one: ValueError if a rank had a problem, else FloatingPointError (the run diverged)."""
    groups = {}
    for rank, problem in enumerate(problems):
        if problem:
            groups.setdefault(problem, []).append(rank)
    if INTERRUPTED in groups:
        ranks = groups[INTERRUPTED]
        raise RunAborted(f"train: rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
                         f"{INTERRUPTED} at step {step}; the run was ended on every rank", interrupted=True)
    if not groups:
        raise FloatingPointError(f"train: the averaged gradient or parameters are not finite at step {step}: "
                                 f"the run diverged (try a smaller lr)")
    said = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {problem}"
                     for problem, ranks in groups.items())
    raise ValueError(f"train: bad gradient at step {step}: {said}")


def stop_together(comm, arrays, problem, step):
    """Return if every array (a reduced result, the same on every rank) is finite; else, on every
    rank at once, gather each rank's problem and raise (raise_problems). comm None: this process only."""
    if all(np.isfinite(a).all() for a in arrays):
        return
    raise_problems([problem] if comm is None else comm.allgather(problem), step)


# ----------------------------------------------------------------------------- the record of a run

class Record:
    """One rank's history (a row per step) and evaluations (a row per epoch), times from its start.

    A history row: step, epoch, loss (the global batch's mean loss: filled in by finish()),
    local_loss and examples (this rank's shard), time (seconds since the start at the step's end),
    compute and communication (seconds of this step on this rank), bytes_sent (by this rank in the
    step; None where MPI's own collective sends them, unseen from Python).
    An evaluation: epoch, step (steps done), time, test_accuracy.
    """

    def __init__(self, model, X_test, y_test):
        self.model, self.X_test, self.y_test = model, X_test, y_test
        self.t0 = time.perf_counter()
        self.history, self.evaluations = [], []

    def start(self, comm=None):
        """Start the clock: on every rank at once, after a barrier (waited for asleep), if comm is given."""
        if comm is not None:
            wait_sleeping(comm.Ibarrier())
        self.t0 = time.perf_counter()

    def now(self):
        return time.perf_counter() - self.t0

    def step(self, step, epoch, local_loss, examples, compute, communication, bytes_sent, end=None):
        self.history.append(dict(step=step, epoch=epoch, loss=None, local_loss=local_loss, examples=examples,
                                 time=self.now() if end is None else end, compute=compute,
                                 communication=communication, bytes_sent=bytes_sent))

    def evaluate(self, epoch, step, params, accuracy=None, when=None):
        """Test accuracy of params after `epoch` (or the accuracy given, measured elsewhere)."""
        if accuracy is None:
            accuracy = self.model.accuracy(params, self.X_test, self.y_test)
        self.evaluations.append(dict(epoch=epoch, step=step, time=self.now() if when is None else when,
                                     test_accuracy=accuracy))

    def finish(self, comm):
        """Fill in each row's loss: sum over ranks of examples * local_loss / sum of examples (one
        allgather of two numbers per step; rows must be aligned by step on every rank)."""
        mine = np.array([[row["local_loss"] * row["examples"], row["examples"]] for row in self.history])
        everyone = [mine] if comm is None else comm.allgather(mine)
        total = sum(everyone)
        for row, (weighted, examples) in zip(self.history, total):
            row["loss"] = float(weighted / examples)


# ----------------------------------------------------------------------------- one run's problem and steps

class Job:
    """What a trainer works on: the model, its initial parameters (from seed), the training data, the
    global batches of every epoch (the sampler seeded with seed), the hyperparameters, and the Record."""

    def __init__(self, model, seed, epochs, batch_size, lr):
        self.model, self.epochs, self.batch_size, self.lr = model, epochs, batch_size, lr
        self.X, self.y, X_test, y_test = digits.load_digits_split()
        self.params = model.init(seed)
        self.sampler = digits.epoch_sampler(len(self.y), seed)
        self.steps_per_epoch = len(self.y) // batch_size
        self.total_steps = epochs * self.steps_per_epoch
        self.record = Record(model, X_test, y_test)
        self._epoch, self._batches = None, None
        self.interrupts = []  # filled by interrupts_noted() while a collective trainer runs

    def interrupted(self):
        """INTERRUPTED if this rank has had a Ctrl-C during the run, else None."""
        return INTERRUPTED if self.interrupts else None

    def batch(self, step):
        """(epoch, the global batch of `step`: an array of row indices)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, digits.global_batches(self.sampler, epoch, self.batch_size)
        return epoch, self._batches[i]

    def steps(self):
        """(step, epoch, batch, epoch_done) for every step of the run, in order."""
        for step in range(self.total_steps):
            epoch, batch = self.batch(step)
            yield step, epoch, batch, (step + 1) % self.steps_per_epoch == 0
