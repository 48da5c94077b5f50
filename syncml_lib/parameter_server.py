"""A parameter server: servers hold the parameters; workers pull them, compute gradients and push.

    result = run_parameter_server(comm, {"w": np.zeros(10)}, grad_fn, steps=100, lr=0.1,
                                  mode="ssp", staleness=2, n_servers=2)
    result.params["w"]     # the final parameters, on every rank
    result.history[0]      # {'worker': 0, 'step': 0, 'read_clock': 0, 'staleness': 0,
                           #  'start': 0.0003, 'pulled': 0.0009, 'end': 0.0012}
    result.step_times[0]   # 0.0011: when step 0 was complete on every server

    result = run_parameter_server(comm, params, grad_fn, steps=100, lr=0.1, mode="bsp", backups=1)
    result.used[0]         # [0, 2]: the workers whose step-0 gradients server 0 averaged
    result.dropped         # [3, 0, 41]: pushes that came too late, per worker

Ranks 0 .. S-1 are servers and the other W ranks are workers. Every parameter is flattened and cut
into S contiguous slices (shard); server s holds slice s of every parameter, so one big
tensor is served by all servers at once. Worker w loops over the steps t: pull its slices from
every server and put them back together, grads = grad_fn(params, w, t), push slice s of every
gradient to server s.

A server's clock is the number of complete steps it holds: every worker's update for every step
below the clock has been applied. The three modes differ in when a pull is answered and when a
push is applied:

    mode           a pull for step t is answered    a push is applied
    bsp            when clock == t                  once all W step-t gradients are in: params -= lr * mean
    bsp, backups b when clock >= t                  once the first W-b step-t gradients are in:
                                                    params -= lr * their mean; a later one is dropped
    ssp            when clock >= t - staleness      at once: params -= lr * grad / W
    asp            at once                          at once: params -= lr * grad / W

So in BSP every worker computes step t on the same parameters, which hold every update before
step t and nothing newer: the result is the sequential one, params -= lr * mean_w grad_fn(params,
w, t) for t = 0, 1, ..., whatever S is (each server sums the gradients in worker order, so the
run is reproducible). In SSP a worker may run up to `staleness` steps ahead of the slowest one;
it blocks only when it would otherwise miss an update from before step t - staleness. ASP never
waits. SSP with staleness 0 has BSP's guarantee (read_clock == step in every history row), but
its pushes are applied as they come, so a fast worker's step-t update may already be in what a
slower worker reads for step t: with plain SGD it ends with BSP's parameters (up to rounding) only
when the gradients do not depend on the parameters.

Backup workers (BSP with backups=b, Chen et al. 2016, "Revisiting Distributed Synchronous SGD"):
a server completes step t as soon as W-b gradients for step t are in, and applies params -= lr *
their mean (summed in worker order). A push for a step the server has already completed is
acknowledged and dropped (result.dropped counts them). A worker whose pull shows clock > its step
(the steps in between were completed without it) skips ahead to the smallest clock among its
servers' replies and computes that step on the parameters it pulled; it has no history row for
the steps it skipped. So a step waits only for the (W-b)-th fastest worker instead of the slowest:
up to b stragglers cost no time. The price: a smaller effective batch (each update averages W-b
gradients, not W) and the slow workers' computation thrown away. Which workers make a step
depends on timing (result.used: server 0's choice per step), so the run is no longer the
sequential one, nor reproducible; with several servers, each server takes the first W-b pushes it
gets, which need not come from the same workers for every slice. backups=0 is plain BSP.

Momentum is per push in SSP and ASP: each push is its own momentum step, velocity = m velocity +
grad_w, then params -= (lr / W) velocity. So the velocity decays W times per step instead of once:
not BSP's momentum (velocity = m velocity + mean grad, params -= lr velocity), even with staleness
0 and gradients that do not depend on the parameters. With a constant gradient g both approach the
same update per step, lr g / (1 - m), by different paths.

Cost per step through each server, with N bytes of parameters: it receives W gradient slices of
N/S bytes and sends W parameter slices of N/S bytes, 2 W N / S bytes in all, plus 4 small control
messages per worker (a request and a reply for the pull and for the push). More servers divide
the load; each worker still moves 2 N bytes per step (with backups, a slow worker that skips
steps moves less, and its dropped pushes travel all the same). (A ring allreduce moves 2 (p-1)/p
N bytes per rank, with no central rank.) Parameters travel with buffer-based messages through
rpc.py.
"""
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import rpc
from .rpc import RunAborted, check_same_on_all_ranks

__all__ = ["ParameterStore", "run_parameter_server", "ParameterServerResult", "check_gradients",
           "may_read", "momentum_update", "shard", "MODES", "OPTIMIZERS"]

MODES = ("bsp", "ssp", "asp")
OPTIMIZERS = ("sgd", "momentum")


# ----------------------------------------------------------------------------- the three rules of the chapter
# Each is a small function the rest of the module calls by name, so the chapter's exercises can put
# a learner's version in its place (checks.py does) and run the whole parameter server with it.

def may_read(step, clock, staleness):
    """SSP's admission rule: may a worker about to compute step `step` read parameters whose clock is
    `clock` (every update of every step below `clock` applied)? Only if it misses no update from a step
    before step - staleness: clock >= step - staleness. BSP is staleness 0; ASP, infinite."""
    return clock >= step - staleness


def momentum_update(param, velocity, grad, lr, momentum):
    """Heavy-ball momentum, in place: velocity = momentum * velocity + grad; param -= lr * velocity."""
    velocity *= momentum
    velocity += grad
    param -= lr * velocity


def shard(flat, n_servers):
    """Cut a flat array into n_servers contiguous slices whose sizes differ by at most one (views):
    server s holds slice s. Together they cover every element exactly once, in order."""
    return np.array_split(flat, n_servers)


# ----------------------------------------------------------------------------- checking the input

def check_gradients(grads, specs):
    """Raise unless grads maps known parameter names to arrays of the right shape and dtype.

    specs maps each parameter name to its (shape, dtype). Unknown name: KeyError naming it;
    wrong shape or dtype: ValueError naming the parameter; grads not a dict: TypeError.
    """
    if not isinstance(grads, dict):
        raise TypeError(f"gradients must be a dict of name -> array, got {type(grads).__name__}")
    for name, grad in grads.items():
        if name not in specs:
            raise KeyError(f"unknown parameter {name!r}; the parameters are {', '.join(map(repr, specs))}")
        shape, dtype = specs[name]
        grad = np.asarray(grad)
        if grad.shape != shape:
            raise ValueError(f"gradient {name!r} has shape {grad.shape}, but the parameter has shape {shape}")
        if grad.dtype != dtype:
            raise ValueError(f"gradient {name!r} has dtype {grad.dtype}, but the parameter has dtype {dtype}")


def _check_optimizer(optimizer, momentum):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers are {', '.join(OPTIMIZERS)}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


def _check_floating(params):
    for name, value in params.items():
        if value.dtype.kind != "f":
            raise ValueError(f"parameter {name!r} has dtype {value.dtype}; parameters must be floating point")


# ----------------------------------------------------------------------------- one store, in process

class ParameterStore:
    """Named numpy parameters and the optimizer that updates them, in one process.

        store = ParameterStore({"w": np.zeros(3)}, lr=0.1, optimizer="momentum", momentum=0.9)
        store.push({"w": np.ones(3)})   # velocity = 0.9 velocity + grad; w -= 0.1 * velocity
        store.pull()["w"]               # array([-0.1, -0.1, -0.1]), a copy
        store.version                   # 1: the number of updates so far

    "sgd" does w -= lr * grad. A push may hold gradients for some of the parameters only; the others
    (and their velocities) stay as they are. A push is checked whole before anything changes.
    """

    def __init__(self, params, lr, optimizer="sgd", momentum=0.9):
        _check_optimizer(optimizer, momentum)
        self._params = {name: np.array(value, copy=True) for name, value in params.items()}
        _check_floating(self._params)
        self.lr, self.optimizer, self.momentum = float(lr), optimizer, momentum
        self._velocity = ({name: np.zeros_like(p) for name, p in self._params.items()}
                          if optimizer == "momentum" else {})
        self.version = 0

    @property
    def specs(self):
        """name -> (shape, dtype) of every parameter."""
        return {name: (p.shape, p.dtype) for name, p in self._params.items()}

    def pull(self, names=None):
        """Copies of the named parameters (all of them by default), as a dict."""
        names = list(self._params) if names is None else [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self._params:
                raise KeyError(f"unknown parameter {name!r}; the parameters are {', '.join(map(repr, self._params))}")
        return {name: self._params[name].copy() for name in names}

    def push(self, grads):
        """Apply one update from grads (name -> gradient array); return the new version.

        KeyError for an unknown name, ValueError for a wrong shape or dtype, and then nothing changes.
        """
        check_gradients(grads, self.specs)
        for name, grad in grads.items():
            if self.optimizer == "momentum":
                momentum_update(self._params[name], self._velocity[name], np.asarray(grad), self.lr, self.momentum)
            else:
                self._params[name] -= self.lr * np.asarray(grad)
        self.version += 1
        return self.version

    def state(self):
        """Everything needed to continue later: copies of the parameters and velocities, and the version."""
        return {"params": self.pull(), "velocity": {name: v.copy() for name, v in self._velocity.items()},
                "version": self.version}

    def load_state(self, state):
        """Continue from what state() returned (checked whole before anything changes)."""
        for part in ("params", "velocity"):
            expected = list(self._params) if part == "params" else list(self._velocity)
            if sorted(state[part]) != sorted(expected):
                raise ValueError(f"the state has {part} for {sorted(state[part])}, but this store "
                                 f"(optimizer {self.optimizer!r}) has {part} for {sorted(expected)}")
            check_gradients(state[part], self.specs)
        self._params = {name: np.array(state["params"][name], copy=True) for name in self._params}
        self._velocity = {name: np.array(state["velocity"][name], copy=True) for name in self._velocity}
        self.version = int(state["version"])


# ----------------------------------------------------------------------------- checkpoints

def _checkpoint_path(directory, server, clock):
    return Path(directory) / f"server{server}-step{clock}.npz"


def _checkpoint_clocks(directory, server):
    """The clocks of the checkpoints this server has in directory, oldest first."""
    prefix = f"server{server}-step"
    found = [path.name[len(prefix):-len(".npz")] for path in Path(directory).glob(f"{prefix}*.npz")]
    return sorted(int(clock) for clock in found if clock.isdigit())


def _save_checkpoint(directory, server, n_servers, clock, store, keep=2):
    """Write this server's slices, velocities and clock atomically (a temp file, then os.replace);
    keep only the `keep` newest checkpoints of this server."""
    state = store.state()
    names = list(state["params"])
    arrays = {"names": np.array(names, dtype=str), "clock": np.array(clock),
              "n_servers": np.array(n_servers), "version": np.array(state["version"])}
    for i, name in enumerate(names):
        arrays[f"param{i}"] = state["params"][name]
        if name in state["velocity"]:
            arrays[f"velocity{i}"] = state["velocity"][name]
    path = _checkpoint_path(directory, server, clock)
    temp = path.with_suffix(".tmp")
    with open(temp, "wb") as file:
        np.savez(file, **arrays)
    os.replace(temp, path)  # a reader sees the old file or the new one, never half of one
    for old in _checkpoint_clocks(directory, server)[:-keep]:
        _checkpoint_path(directory, server, old).unlink(missing_ok=True)


def _load_checkpoint(directory, server, n_servers, clock, store):
    path = _checkpoint_path(directory, server, clock)
    with np.load(path) as saved:
        names = [str(name) for name in saved["names"]]
        if int(saved["n_servers"]) != n_servers or names != list(store.specs):
            raise ValueError(f"checkpoint {path} was written by a run with {int(saved['n_servers'])} servers "
                             f"and parameters {names}; this run has {n_servers} servers and "
                             f"parameters {list(store.specs)}")
        store.load_state({"params": {name: saved[f"param{i}"] for i, name in enumerate(names)},
                          "velocity": {name: saved[f"velocity{i}"] for i, name in enumerate(names)
                                       if f"velocity{i}" in saved},
                          "version": saved["version"]})


# ----------------------------------------------------------------------------- the server

class _Server:
    """One server rank: its slice of every parameter, and the rules of the mode for pulls and pushes."""

    def __init__(self, comm, store, workers, mode, staleness, clock, checkpoint, backups=0):
        self.comm, self.store, self.mode = comm, store, mode
        self.names = list(store.specs)
        self.worker_of = {rank: w for w, rank in enumerate(workers)}
        self.n_workers = len(workers)
        self.lag = {"bsp": 0, "ssp": staleness, "asp": math.inf}[mode]  # how far a reader may be ahead
        self.clock = clock  # every worker's update for every step below it has been applied
        self.pushed = [clock] * self.n_workers  # ssp, asp: steps each worker has pushed
        self.pending = {}  # bsp: worker -> its gradient slices for step `clock`
        self.needed = self.n_workers - backups  # bsp: the gradients that complete a step
        self.dropped = [0] * self.n_workers  # bsp with backups: late pushes dropped, per worker
        self.used = []  # bsp: for each step completed here, the workers whose gradients made it
        self.tick_times = []  # time.perf_counter() when each step completed here
        self.waiting = []  # (rank, step) of the pulls held back
        self.bytes_received = self.bytes_sent = 0
        self.checkpoint = checkpoint  # clock -> None: saves a checkpoint when due

    def handlers(self):
        return {"pull": self.pull, "push": self.push}

    def pull(self, source, header, arrays):
        if not may_read(header["step"], self.clock, self.lag):
            self.waiting.append((source, header["step"]))
            return rpc.DEFER
        return self._parameters()

    def _parameters(self):
        """The reply to a pull: the clock, and this server's slices in parameter order."""
        slices = list(self.store.pull().values())
        self.bytes_sent += sum(s.nbytes for s in slices)
        return {"clock": self.clock}, slices

    def push(self, source, header, arrays):
        worker, step = self.worker_of[source], header["step"]
        if len(arrays) != len(self.names):
            raise ValueError(f"worker {worker} pushed {len(arrays)} gradients, expected {len(self.names)}")
        grads = dict(zip(self.names, arrays))
        check_gradients(grads, self.store.specs)
        expected = self.clock if self.mode == "bsp" else self.pushed[worker]
        # with backups, a step may have been completed without this worker: its push is late
        late = self.mode == "bsp" and self.needed < self.n_workers and step < self.clock
        if step != expected and not late:
            raise ValueError(f"worker {worker} pushed step {step}, expected step {expected}")
        self.bytes_received += sum(a.nbytes for a in arrays)
        # All checked: acknowledge before applying, so the worker goes on to its next server while
        # this one computes and the servers' updates overlap instead of queueing behind each other.
        # (Its next pull here is answered only after the update, by the clock rule.) The push has had
        # its one reply: if applying it fails (a checkpoint that cannot be written), rpc.serve ends
        # the run on every rank with the error, and answers nothing twice.
        rpc.reply(self.comm, source)
        if late:
            self.dropped[worker] += 1
        elif self.mode == "bsp":
            self.pending[worker] = grads
            if len(self.pending) == self.needed:  # all W of them, or the first W - backups
                used = sorted(self.pending)  # summed in worker order: reproducible for a given set
                mean = {name: sum(self.pending[w][name] for w in used) / len(used) for name in self.names}
                self.store.push(mean)
                self.used.append(used)
                self.pending = {}
                self._tick()
        else:
            self.store.push(grads)  # the store's learning rate is lr / W (see run_parameter_server)
            self.pushed[worker] += 1
            if min(self.pushed) > self.clock:
                self._tick()
        return rpc.DEFER

    def _tick(self):
        """One more step is complete: checkpoint if due, and answer the pulls that may go now."""
        self.clock += 1
        self.tick_times.append(time.perf_counter())
        self.checkpoint(self.clock)
        still_waiting = []
        for source, step in self.waiting:
            if may_read(step, self.clock, self.lag):
                rpc.reply(self.comm, source, *self._parameters())
            else:
                still_waiting.append((source, step))
        self.waiting = still_waiting


def _start_server(me, init_params, n_servers, lr, mode, staleness, optimizer, momentum, start,
                  checkpoint_dir, checkpoint_every, comm, backups=0):
    """This server's store (its slice of every parameter, resumed from the checkpoint at `start` if
    any) and its _Server. Returns (server, problem): problem is a message if it cannot resume."""
    # BSP applies lr * mean of W gradients; SSP and ASP apply each gradient alone, lr * grad / W,
    # which a store with learning rate lr / W does in two passes over the slice instead of three.
    store_lr = lr if mode == "bsp" else lr / len(me.workers)
    store = ParameterStore({name: shard(value.reshape(-1), n_servers)[me.index]
                            for name, value in init_params.items()}, store_lr, optimizer, momentum)
    problem = None
    try:
        if start:
            _load_checkpoint(checkpoint_dir, me.index, n_servers, start, store)
    except (OSError, KeyError, ValueError) as error:
        problem = f"server {me.index} cannot resume from step {start}: {type(error).__name__}: {error}"

    def checkpoint(clock):
        if checkpoint_every and clock % checkpoint_every == 0:
            _save_checkpoint(checkpoint_dir, me.index, n_servers, clock, store)

    return _Server(comm, store, me.workers, mode, staleness, start, checkpoint, backups), problem


# ----------------------------------------------------------------------------- the worker

def _work(run, worker, servers, specs, grad_fn, start, steps, t0):
    """One worker's loop over the steps; returns its history rows. If its own code fails, the run
    ends on every rank with "worker 1 failed at step 3: ..." (run.fail).

    With backups (BSP), the servers may complete steps without this worker: when its pull shows
    that, it skips ahead to the smallest clock among the replies (the first step some server still
    waits for), or stops if every step is complete; it has no history row for the steps skipped."""
    comm, history, step = run.comm, [], start
    try:
        while step < steps:
            began = time.perf_counter() - t0
            pieces, clocks = [], []
            for server in servers:
                header, slices = rpc.call(comm, server, "pull", {"step": step})
                pieces.append(slices)
                clocks.append(header["clock"])
            params = {name: np.concatenate([piece[i] for piece in pieces]).reshape(shape)
                      for i, (name, (shape, _)) in enumerate(specs.items())}
            pulled = time.perf_counter() - t0
            read_clock = min(clocks)
            if read_clock > step:  # only with backups: steps step .. read_clock - 1 were done without us
                step = read_clock
                if step >= steps:
                    break

            grads = grad_fn(params, worker, step)
            check_gradients(grads, specs)
            missing = [name for name in specs if name not in grads]
            if missing:
                raise ValueError(f"grad_fn returned no gradient for {', '.join(map(repr, missing))}")
            slices = {name: shard(np.asarray(grads[name]).reshape(-1), len(servers)) for name in specs}
            for s, server in enumerate(servers):  # a server that completed `step` meanwhile drops it
                rpc.call(comm, server, "push", {"step": step}, [slices[name][s] for name in specs])

            history.append(dict(worker=worker, step=step, read_clock=read_clock, staleness=step - read_clock,
                                start=began, pulled=pulled, end=time.perf_counter() - t0))
            step += 1
    except RunAborted:
        raise
    except BaseException as error:
        run.own_failure(error, f"worker {worker}", f"at step {step}")
    for server in servers:
        rpc.call(comm, server, rpc.DONE)
    return history


# ----------------------------------------------------------------------------- the whole run

@dataclass
class ParameterServerResult:
    """What run_parameter_server returns, the same on every rank.

    params: name -> final array. history: one dict per (worker, step), sorted by worker then step,
    with read_clock (the number of complete steps in what the worker read: the smallest server
    clock among its pulls), staleness (step - read_clock) and the times start, pulled and end in
    seconds since a common origin. server_bytes: one dict per server, bytes of parameter and
    gradient payload it sent and received. start_step: the step the run started at (0, or the
    checkpoint it resumed from).

    step_times: for each step from start_step on, when it was complete on every server (the
    latest of the servers' times, on the history's clock). dropped: per worker, the pushes the
    servers dropped because their step was already complete (summed over the servers; all 0
    without backups). used: in BSP, for each step from start_step on, the sorted workers whose
    gradients server 0 averaged (all of them without backups); None in SSP and ASP. With backups
    a worker has no history row for the steps it skipped.
    """
    params: dict
    history: list
    server_bytes: list
    start_step: int
    step_times: list
    dropped: list
    used: list


def _check_arguments(steps, mode, staleness, checkpoint_dir, checkpoint_every, resume, backups=0):
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}")
    if not isinstance(staleness, int) or staleness < 0:
        raise ValueError(f"staleness must be a non-negative integer, got {staleness!r}")
    if staleness and mode != "ssp":
        raise ValueError(f"staleness={staleness} only applies to mode='ssp', not {mode!r}")
    if not isinstance(backups, int) or isinstance(backups, bool) or backups < 0:
        raise ValueError(f"backups must be a non-negative integer, got {backups!r}")
    if backups and mode != "bsp":
        raise ValueError(f"backups={backups} only applies to mode='bsp' (backup workers), not {mode!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if checkpoint_dir is None and (checkpoint_every is not None or resume):
        raise ValueError("checkpoint_every and resume need a checkpoint_dir")


def _start_step(comm, me, checkpoint_dir, resume):
    """Collective: the newest clock every server has a checkpoint for (0 if none, or not resuming).
    A fresh run deletes the servers' old checkpoints instead."""
    clocks = []
    if me.is_server and checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        if resume:
            clocks = _checkpoint_clocks(checkpoint_dir, me.index)
        else:
            for old in _checkpoint_clocks(checkpoint_dir, me.index):
                _checkpoint_path(checkpoint_dir, me.index, old).unlink()
    everyone = comm.allgather(clocks)
    return max(set.intersection(*(set(everyone[s]) for s in me.servers)), default=0)


def run_parameter_server(comm, init_params, grad_fn, *, steps, lr, mode="bsp", staleness=0, n_servers=1,
                         optimizer="sgd", momentum=0.9, checkpoint_dir=None, checkpoint_every=None,
                         resume=False, backups=0):
    """Train with a parameter server on all ranks of comm (collective); return a ParameterServerResult.

    init_params: name -> floating-point array, the same on every rank (the servers take their
    slices from it). grad_fn(params, worker, step) -> dict of a gradient for every parameter, with
    its shape and dtype; worker counts from 0 among the workers. mode is "bsp", "ssp" (with
    `staleness`) or "asp"; optimizer "sgd" or "momentum" (with `momentum`). Ranks 0 .. n_servers-1
    serve; ValueError on every rank if that leaves no worker.

    backups (BSP only, 0 to W-1): a step is applied as soon as W - backups workers' gradients for it
    are in, averaging those; later pushes for it are dropped and a worker that falls behind skips
    ahead (see the module docstring, result.used and result.dropped).

    Checkpoints: with checkpoint_dir and checkpoint_every=k, each server saves its slices,
    velocities and clock whenever its clock reaches a multiple of k, keeping its 2 newest. `steps`
    is always the total: resume=True starts from the newest clock that every server has a
    checkpoint for (from 0 if there is none, see result.start_step) and runs the steps from there
    up to `steps`. A fresh run (resume=False) deletes the servers' old checkpoints in
    checkpoint_dir. In BSP a checkpoint at clock c holds exactly steps 0 .. c-1, so a resumed run
    ends as an uninterrupted one would; in SSP and ASP it may also hold some later updates, which
    the resumed run applies again.

    Failures end the run on every rank (rpc.Run): if a worker's grad_fn raises (or its gradients
    are wrong), every rank raises RunAborted("worker 1 failed at step 3: ValueError: ..."); if a
    server fails (a checkpoint it cannot write), RunAborted("server 0: OSError: ..."); on Ctrl-C the
    interrupted ranks raise KeyboardInterrupt and the others RunAborted naming them.
    """
    init_params = {name: np.asarray(value) for name, value in init_params.items()}
    specs = {name: (value.shape, value.dtype) for name, value in init_params.items()}
    with rpc.Run(comm, "run_parameter_server") as run:
        with run.setup():
            check_same_on_all_ranks(
                run.comm, "run_parameter_server", names=tuple(specs), shapes=tuple(s for s, _ in specs.values()),
                dtypes=tuple(str(d) for _, d in specs.values()), steps=steps, lr=lr, mode=mode,
                staleness=staleness, n_servers=n_servers, optimizer=optimizer, momentum=momentum,
                checkpoint_dir=str(checkpoint_dir), checkpoint_every=checkpoint_every, resume=resume,
                backups=backups)
            _check_arguments(steps, mode, staleness, checkpoint_dir, checkpoint_every, resume, backups)
            _check_optimizer(optimizer, momentum)
            _check_floating(init_params)
            me = rpc.roles(run.comm, n_servers)
            if backups >= len(me.workers):
                n = len(me.workers)
                raise ValueError(f"backups={backups} with {n} worker{'s' if n > 1 else ''}: a step needs the "
                                 f"gradient of at least one worker, so backups must be at most {n - 1}")
            start = _start_step(run.comm, me, checkpoint_dir, resume)
            problem = None
            if me.is_server:
                server, problem = _start_server(me, init_params, n_servers, lr, mode, staleness, optimizer,
                                                momentum, start, checkpoint_dir, checkpoint_every, run.comm,
                                                backups)
            problems = [p for p in run.comm.allgather(problem) if p]  # also lines up the ranks for t0
            if problems:
                raise ValueError(problems[0])

        t0 = time.perf_counter()
        if me.is_server:
            rpc.serve(run.comm, server.handlers(), clients=me.workers)
            mine = {"slices": list(server.store.pull().values()),
                    "bytes": {"sent": server.bytes_sent, "received": server.bytes_received},
                    "step_times": [t - t0 for t in server.tick_times], "dropped": server.dropped,
                    "used": server.used if mode == "bsp" else None}
        else:
            mine = {"history": _work(run, me.index, me.servers, specs, grad_fn, start, steps, t0)}
        everyone = run.allgather(mine)

    servers, workers = everyone[:n_servers], everyone[n_servers:]
    params = {name: np.concatenate([server["slices"][i] for server in servers]).reshape(shape)
              for i, (name, (shape, _)) in enumerate(specs.items())}
    history = [row for worker in workers for row in worker["history"]]
    step_times = [max(times) for times in zip(*(server["step_times"] for server in servers))]
    dropped = [sum(counts) for counts in zip(*(server["dropped"] for server in servers))]
    return ParameterServerResult(params, history, [server["bytes"] for server in servers], start,
                                 step_times, dropped, servers[0]["used"])
