"""Chapter 06: one model trained with every mechanism of the course, on real data.

    result = train(comm, "allreduce", model="mlp", epochs=4, batch_size=32, lr=0.2, algorithm="ring")
    result.params            # name -> final array, equal on every rank
    result.test_accuracy     # on the 360 held-out digits: 0.969
    result.history[0]        # {'step': 0, 'epoch': 0, 'loss': 2.63, 'time': 0.002, 'compute': ..., ...}
    reference = train(None, "sequential", model="mlp", epochs=4, batch_size=32, lr=0.2)   # the same params

The problem (digits.py): scikit-learn's digits, a fixed split, a network in plain numpy whose
backward pass yields each layer's gradient, last layer first. Each epoch is one seeded shuffle cut
into global batches; each global batch is split over the ranks in blocks. The mechanisms, and
what holds between them (up to rounding):

    sequential   the whole global batch in one process                       the reference
    allreduce    each rank its shard; weighted_average of the gradients       = sequential
    ps           servers hold the parameters; workers push their shard's      BSP = allreduce
                 gradient (run_parameter_server; mode bsp, ssp, asp)
    local_sgd    H local steps, then average_parameters                       H = 1: = allreduce
    bucketed     the gradient reduced in buckets of layers (assign_buckets),  = allreduce
                 by MPI's Iallreduce, overlapped with the backward pass

One module per mechanism, each with the small function of its idea (data_parallel.weighted_average,
local_sgd.average_parameters, bucketing.assign_buckets), which the trainer calls by name: set another
function in its place on that module (e.g. `training.data_parallel.weighted_average = mine`) and
the trainer uses it. loop.py holds what they share: checked gradients, stopping every rank together
on a bad gradient, the record of the run.
"""
import numbers
import time
from dataclasses import dataclass

from ..allreduce import ALGORITHMS
from .. import compression  # the module (it imports training.loop: its names are looked up when used)
from ..parameter_server import MODES
from ..rpc import RunAborted, check_same_on_all_ranks, swallow_interrupts
from . import bucketing, data_parallel, local_sgd, ps
from .bucketing import assign_buckets
from .data_parallel import weighted_average
from .local_sgd import average_parameters
from .loop import Job, fingerprint, interrupts_noted, one_blas_thread
from .digits import MLP, MODELS, get_model, load_digits_split

__all__ = ["train", "TrainResult", "MECHANISMS", "time_to_accuracy", "weighted_average", "average_parameters",
           "assign_buckets", "MLP", "MODELS", "get_model", "load_digits_split"]

# mechanism -> its options and their defaults (staleness None: 2 in SSP, else 0)
MECHANISMS = {
    "sequential": {},
    "allreduce": {"algorithm": "ring", "compression": None},
    "ps": {"mode": "bsp", "staleness": None, "n_servers": 1, "backups": 0},
    "local_sgd": {"H": 4, "algorithm": "ring"},
    "bucketed": {"bucket_bytes": 32 << 10, "overlap": True},
}


@dataclass
class TrainResult:
    """What train returns on every rank.

    params: name -> final float64 array (equal on every rank). test_accuracy: of params on the test
    set. history: one dict per step as this rank saw it: step, epoch, loss (of the whole global batch,
    the same on every rank), local_loss and examples (this rank's shard), time (seconds since the
    start at the step's end), compute and communication (seconds of the step on this rank), bytes_sent
    (by this rank in the step; None for MPI's own collectives). evaluations: one dict per epoch:
    epoch, step, time, test_accuracy. options: the mechanism's options as run (defaults filled in).
    seconds: this rank's time for the whole run.
    """
    mechanism: str
    model: str
    options: dict
    params: dict
    test_accuracy: float
    history: list
    evaluations: list
    steps_per_epoch: int
    seconds: float


def time_to_accuracy(result, target=0.95):
    """Seconds from the start to the end of the first epoch after which the test accuracy reached
    target, or None if it never did. result: a TrainResult, or its evaluations."""
    evaluations = getattr(result, "evaluations", result)
    return next((e["time"] for e in evaluations if e["test_accuracy"] >= target), None)


# ----------------------------------------------------------------------------- checking the arguments

def _options(mechanism, options):
    """The mechanism's options with defaults filled in; ValueError for an unknown mechanism or option."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}; valid mechanisms are {', '.join(MECHANISMS)}")
    unknown = [name for name in options if name not in MECHANISMS[mechanism]]
    if unknown:
        valid = ", ".join(MECHANISMS[mechanism]) or "none"
        raise ValueError(f"train: {mechanism!r} has no option {', '.join(map(repr, unknown))}; its options: {valid}")
    merged = {**MECHANISMS[mechanism], **options}
    if mechanism == "ps" and merged["staleness"] is None:
        merged["staleness"] = 2 if merged["mode"] == "ssp" else 0
    return merged


def _is_int(value, at_least):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= at_least


def _check_arguments(comm, mechanism, epochs, batch_size, lr, options, n_train):
    """ValueError for a bad argument. Depends only on arguments that every rank has checked are equal."""
    if not _is_int(epochs, 1):
        raise ValueError(f"train: epochs must be a positive integer, got {epochs!r}")
    if not isinstance(lr, numbers.Real) or not lr > 0:
        raise ValueError(f"train: lr must be a positive number, got {lr!r}")
    if not _is_int(batch_size, 1) or batch_size > n_train:
        raise ValueError(f"train: batch_size must be an integer from 1 to {n_train} (the training set), "
                         f"got {batch_size!r}")
    if mechanism != "sequential":
        if comm is None:
            raise ValueError(f"train: {mechanism!r} needs a communicator; comm=None is for 'sequential' only")
        computing = comm.size - (options["n_servers"] if mechanism == "ps" else 0)
        if computing >= 1 and batch_size < computing:
            who = "workers" if mechanism == "ps" else "ranks"
            raise ValueError(f"train: batch_size {batch_size} is smaller than the {computing} {who} that compute: "
                             f"each needs at least one example of every global batch")
    if options.get("algorithm", "ring") not in (*ALGORITHMS, "auto"):
        raise ValueError(f"train: unknown algorithm {options['algorithm']!r}; valid: {', '.join(ALGORITHMS)}, auto")
    if mechanism == "ps":
        if options["mode"] not in MODES:
            raise ValueError(f"train: unknown mode {options['mode']!r}; valid modes are {', '.join(MODES)}")
        if not _is_int(options["n_servers"], 1):
            raise ValueError(f"train: n_servers must be a positive integer, got {options['n_servers']!r}")
        backups, n_workers = options["backups"], comm.size - options["n_servers"]
        if not _is_int(backups, 0):
            raise ValueError(f"train: backups must be a non-negative integer, got {backups!r}")
        if backups and options["mode"] != "bsp":
            raise ValueError(f"train: backups={backups} only applies to mode='bsp' (backup workers), "
                             f"not {options['mode']!r}")
        if backups and backups >= n_workers >= 1:
            raise ValueError(f"train: backups={backups} with {n_workers} worker{'s' if n_workers > 1 else ''}: "
                             f"a step needs the gradient of at least one worker, so backups must be at most "
                             f"{n_workers - 1}")
    if mechanism == "allreduce":
        compression.get_compressor(options["compression"])  # ValueError for an unknown one
    if mechanism == "local_sgd" and not _is_int(options["H"], 1):
        raise ValueError(f"train: H must be a positive integer, got {options['H']!r}")
    if mechanism == "bucketed":
        if options["bucket_bytes"] is not None and not (isinstance(options["bucket_bytes"], numbers.Real)
                                                        and options["bucket_bytes"] >= 0):
            raise ValueError(f"train: bucket_bytes must be a number of bytes >= 0, or None for one bucket; "
                             f"got {options['bucket_bytes']!r}")
        if not isinstance(options["overlap"], bool):
            raise ValueError(f"train: overlap must be True or False, got {options['overlap']!r}")


# ----------------------------------------------------------------------------- the entry point

def _train_together(comm, mechanism, job, options):
    """Run a collective mechanism's trainer; return the final parameters."""
    if mechanism == "ps":  # run_parameter_server ends the run on every rank itself, on an error or Ctrl-C
        return ps.train_ps(comm, job, options["mode"], options["staleness"], options["n_servers"],
                           options["backups"])
    with interrupts_noted() as job.interrupts:  # a Ctrl-C stops every rank at the same step (loop.py)
        if mechanism == "allreduce":
            return data_parallel.train_data_parallel(comm, job, options["algorithm"],
                                                     compression.get_compressor(options["compression"]))
        if mechanism == "local_sgd":
            return local_sgd.train_local_sgd(comm, job, options["H"], options["algorithm"])
        return bucketing.train_bucketed(comm, job, options["bucket_bytes"], options["overlap"])


def train(comm, mechanism, *, model="mlp", epochs, batch_size, lr, seed=0, check=True, **options):
    """Train `model` ("softmax", "mlp" or a model object) on the digits with `mechanism` on every rank
    of comm (collective; comm may be None for "sequential"); return a TrainResult.

    Options by mechanism (defaults in MECHANISMS): allreduce: algorithm (any of allreduce.ALGORITHMS, or
    "auto"), compression (None, or a compressor of compression.py: TopK(0.01), Int8(), Sign(), LowRank(2),
    or one's name); ps: mode ("bsp", "ssp", "asp"), staleness (SSP: 2), n_servers, backups (BSP: a step
    waits for the first W - backups workers' gradients only); local_sgd: H, algorithm;
    bucketed: bucket_bytes (0: a bucket per layer, None: one bucket), overlap. Plain SGD with a
    constant lr; `epochs` passes over the training set in global batches of batch_size.

    Before training, every rank checks (one small allgather each) that all ranks passed the same
    arguments, and then that they hold the same data and initial parameters (from `seed`): if not,
    every rank raises ValueError naming which ranks differ. check=False skips both (to see what
    happens without them). Bad arguments raise ValueError on every rank; a bad gradient on any rank,
    or a diverging run, ends the run on every rank with the same error (loop.py); so does Ctrl-C on
    any rank (RunAborted, interrupted=True).
    """
    together = comm is not None and mechanism != "sequential"
    if together and check:  # first, before anything that could raise on some ranks only
        check_same_on_all_ranks(comm, "train", mechanism=mechanism, epochs=epochs, batch_size=batch_size, lr=lr,
                                model=model if isinstance(model, str) else getattr(model, "name", "a model object"),
                                options=repr(sorted(options.items())))
    options = _options(mechanism, options)
    model = get_model(model)
    X_train, _, _, _ = load_digits_split()
    _check_arguments(comm if together else None, mechanism, epochs, batch_size, lr, options, len(X_train))
    job = Job(model, seed, epochs, batch_size, lr)
    if together and check:
        check_same_on_all_ranks(comm, "train", seed=seed, initial_parameters=fingerprint(job.params),
                                data=fingerprint(dict(zip("Xy", (job.X, job.y)))))

    began = time.perf_counter()
    if mechanism == "sequential":
        params = data_parallel.train_data_parallel(None, job)
    else:
        with one_blas_thread():
            try:
                params = _train_together(comm, mechanism, job, options)
            except RunAborted as error:
                if error.interrupted:  # this rank's own Ctrl-C may still be on its way: let it pass
                    swallow_interrupts()
                raise
    seconds = time.perf_counter() - began
    job.record.finish(comm if together else None)
    return TrainResult(mechanism, model.name, options, params, job.record.evaluations[-1]["test_accuracy"],
                       job.record.history, job.record.evaluations, job.steps_per_epoch, seconds)
