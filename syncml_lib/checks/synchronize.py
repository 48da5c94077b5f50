"""Chapter 01's exercises: the Lamport clock rule, the compare-and-set update, the expected wait at a barrier.

Each check tries the learner's function on its own cases first (in process), then runs it for real:
the clock rule in place of clocks.lamport_tick over the trace of a real run_clocked_workers on the
ranks; the compare-and-set update in place of shared_value.cas_update inside a real
run_shared_updates where every worker reads before anyone writes; the expected wait against a seeded
run of many barrier steps whose slowest worker MPI's Allreduce(MAX) finds.
"""
import numpy as np

from .harness import _anyone, _call, _in_place_of, _is_int, _table, _wrong_type, exercise_check

# ---------------------------------------------------------------- the Lamport clock rule

TICK_CASES = (  # (clock, received), expected, why
    ((0, None), 1, "a local event or a send: clock + 1"),
    ((5, None), 6, "a local event or a send: clock + 1"),
    ((3, 7), 8, "a receive of a message stamped 7 by a rank at 3: max(3, 7) + 1, later than its send"),
    ((9, 2), 10, "a receive of an old message (stamped 2) by a rank at 9: max(9, 2) + 1, the clock never goes back"),
    ((4, 4), 5, "a receive of a message stamped 4 by a rank at 4: max + 1 = 5, strictly later than the send"),
)
TICK_HINTS = {(3, 7): {4: "you ignored the message's stamp (clock + 1), or took the smaller of the two: a receive "
                          "takes the larger", 7: "you forgot the + 1: the receive would have the same clock as its send",
                       10: "add 1 to the larger of the two, not the sum"},
              (9, 2): {3: "you took the message's stamp + 1 and ignored your own clock, which went back from 9",
                       9: "you forgot the + 1"},
              (4, 4): {4: "you forgot the + 1: the receive must be strictly later than its send"}}


def _judge_tick(args, got, expected, why):
    problem = _wrong_type(got, _is_int, "a Lamport clock is a whole number: return an int")
    if problem or got == expected:
        return problem
    hint = TICK_HINTS.get(args, {}).get(got)
    return f"returned {got}, expected {expected}: {hint or why}"


def _traced_run(comm):
    """A real run_clocked_workers (SSP, s = 1, 4 iterations of seeded 1-3 ms) on every rank: its trace."""
    from ..consistency import run_clocked_workers

    delays = np.random.default_rng([101, comm.rank]).uniform(0.001, 0.003, size=4)
    return run_clocked_workers(comm, delays, staleness=1).messages


def _tick_on_rank(comm, lamport_tick):
    from .. import clocks

    problems = _table(lamport_tick, TICK_CASES, lambda i, args: f"lamport_tick(clock={args[0]}, received={args[1]})",
                      _judge_tick)
    if _anyone(comm, problems):
        return problems
    records = _traced_run(comm)
    run = f"the trace of a real run_clocked_workers on {comm.size} ranks ({len(records)} message records)"
    try:
        with _in_place_of(clocks, "lamport_tick", lamport_tick):
            stamped = clocks.lamport_clocks(records)
    except Exception as exc:
        return [f"stamping {run} with your lamport_tick failed: {type(exc).__name__}: {exc}"]
    broken = clocks.violations(stamped)
    return [f"on {run}, your clocks break happens-before: {broken[0]}"] if broken else []


@exercise_check(_tick_on_rank)
def check_lamport_tick(lamport_tick):
    """lamport_tick(clock, received=None) must return clock + 1, or max(clock, received) + 1 for a receive."""


# ---------------------------------------------------------------- compare-and-set

MAX_ATTEMPTS = 1000  # failed compare-and-sets in a row (real run) before the check calls it a loop that never reads again
CAS_ROUNDS = 8


class _Stop(BaseException):
    """Ends a learner's loop that would never end on _Interfered (a BaseException, so that _call lets it
    through to _first_trial, which turns it into the message)."""


class _Interfered:
    """A store in this process, for the first trial: one value "w" of 2 elements, version 0. Another
    worker's update (+1 on element 1) gets in just before the first compare_and_set, so that one fails
    (if it carries the version read). Every call is recorded, with what it returned, for the message."""

    LIMIT = 50

    def __init__(self):
        self.value, self.version, self.round = np.zeros(2), 0, 0
        self.calls, self.interfered = [], False  # (name, arguments, returned)

    def _key(self, key):
        if key != "w":
            raise KeyError(f"no value named {key!r} (the store holds 'w')")

    def _no_end(self):
        if len(self.calls) >= 2 * self.LIMIT:
            raise _Stop(f"your function made {len(self.calls)} calls to the store and had not returned: after a "
                        f"compare-and-set that returned True, return")

    def read(self, key):
        self._key(key)
        self._no_end()
        self.calls.append(("read", None, (self.value.tolist(), self.version)))
        return self.value.copy(), self.version

    def compare_and_set(self, key, value, version):
        self._key(key)
        if not self.interfered:  # another worker's update gets in just now
            self.value, self.version, self.interfered = self.value + np.array([0.0, 1.0]), self.version + 1, True
        stored = version == self.version
        if stored:
            self.value, self.version = np.array(value, dtype=float), self.version + 1
        self.calls.append(("compare_and_set", (np.asarray(value).tolist(), version), stored))
        failures = 0
        for name, _, returned in reversed(self.calls):
            if name == "compare_and_set":
                if returned:
                    break
                failures += 1
        if failures >= self.LIMIT:
            raise _Stop(f"compare_and_set failed {failures} times in a row, each with version {version}: after a "
                        f"failure, read again to get the current value and version")
        self._no_end()
        return stored

    def write(self, key, value):
        self._key(key)
        self.calls.append(("write", (np.asarray(value).tolist(),), None))
        self.value = np.array(value, dtype=float)

    def add(self, key, delta):
        self._key(key)
        self.calls.append(("add", (np.asarray(delta).tolist(),), None))
        self.value = self.value + np.asarray(delta, dtype=float)

    def described(self, shown=6):
        parts = []
        for name, arguments, returned in self.calls[:shown]:
            if name == "read":
                parts.append(f"read() -> ({returned[0]}, version {returned[1]})")
            elif name == "compare_and_set":
                parts.append(f"compare_and_set({arguments[0]}, version {arguments[1]}) -> {returned}")
            else:
                parts.append(f"{name}({arguments[0]})")
        more = f"; ... ({len(self.calls)} calls in all)" if len(self.calls) > shown else ""
        return "; ".join(parts) + more if parts else "nothing"


def _judge_first_trial(store):
    """What went wrong on _Interfered, in the learner's terms, or None."""
    names = [name for name, _, _ in store.calls]
    if "write" in names:
        return "you called store.write, which stores whatever it is sent: the last writer wins; use compare_and_set"
    if "add" in names:
        return "you called store.add: that is the other fix (the server adds); this exercise is compare-and-set"
    if store.value.tolist() == [1.0, 1.0]:
        return None
    stores = [(arguments, i) for i, (name, arguments, returned) in enumerate(store.calls)
              if name == "compare_and_set" and returned]
    if not stores:
        return ("your compare-and-set failed (another worker wrote after your read), stored nothing, and your function "
                "returned: read again and retry until a compare-and-set returns True")
    (value, version), at = stores[0]
    reads = [returned for name, _, returned in store.calls[:at] if name == "read"]
    if reads and version != reads[-1][1]:
        return (f"your compare-and-set passed version {version}, but the read before it returned version "
                f"{reads[-1][1]}: it stored {value} over the other worker's update; pass the version that read() returned")
    if reads and value != [x + d for x, d in zip(reads[-1][0], [1.0, 0.0])]:
        return (f"your compare-and-set stored {value}, but the read before it returned {reads[-1][0]}: compute the new "
                f"value from the latest read (value + delta), not from an earlier one")
    return f"the store ends as {store.value.tolist()}, expected [1.0, 1.0] (both updates)"


def _first_trial(cas_update):
    """The learner's function on _Interfered: None, or what went wrong."""
    store = _Interfered()
    what = ("cas_update(store, 'w', delta=[1, 0]) on a store where another worker adds [0, 1] just before your first "
            "compare-and-set")
    try:
        _, error = _call(cas_update, store, "w", np.array([1.0, 0.0]))
    except _Stop as stop:
        return f"{what}: {stop}. Your calls: {store.described()}"
    if error:
        return f"{what}: your function {error}"
    problem = _judge_first_trial(store)
    return f"{what}: {problem}. Your calls: {store.described()}" if problem else None


def _cas_on_rank(comm, cas_update):
    from .. import shared_value

    problems = [p for p in [_first_trial(cas_update)] if p]
    if _anyone(comm, problems) or comm.size < 2:
        return problems

    class Watched(shared_value.SharedStore):
        """The library's store, which gives up on a compare-and-set that fails MAX_ATTEMPTS times in a row."""

        def compare_and_set(self, key, value, version):
            stored = super().compare_and_set(key, value, version)
            self.failures = 0 if stored else getattr(self, "failures", 0) + 1
            if self.failures >= MAX_ATTEMPTS:
                raise RuntimeError(f"{MAX_ATTEMPTS} compare-and-sets failed in a row in round {self.round}: after a "
                                   f"failure, read again, so that the next one carries the current version")
            return stored

    run = (f"a real run_shared_updates('cas', rounds={CAS_ROUNDS}) on {comm.size} ranks, every worker reading "
           f"before any writes")
    try:
        with _in_place_of(shared_value, "cas_update", cas_update), _in_place_of(shared_value, "SharedStore", Watched):
            result = shared_value.run_shared_updates(comm, "cas", rounds=CAS_ROUNDS)
    except Exception as exc:
        return [f"{run} with your cas_update failed: {type(exc).__name__}: {exc}"]
    for worker, kept in enumerate(result.value):
        if kept != CAS_ROUNDS:
            lost = f"{CAS_ROUNDS - kept:g} of its updates were lost" if kept < CAS_ROUNDS else "some counted twice"
            kinds = {row["kind"] for row in result.log}
            hint = ("; your function wrote with store.write, and the last writer wins" if "write" in kinds else
                    "; a compare-and-set that returns False stored nothing: retry until one returns True"
                    if kept < CAS_ROUNDS else "; return once a compare-and-set has returned True")
            return [f"{run}: worker {worker} (rank {worker + 1}) made {CAS_ROUNDS} updates and the final value holds "
                    f"{kept:g}: {lost}{hint}"]
    return []


@exercise_check(_cas_on_rank)
def check_cas_update(cas_update):
    """cas_update(store, key, delta) must add delta to the server's value with store.read and
    store.compare_and_set, retrying until the compare-and-set stores, so that no update is lost."""


# ---------------------------------------------------------------- the expected wait at a barrier

WAIT_CASES = (  # (n_workers, mean), why
    ((1, 0.01), "one worker never waits: 0"),
    ((2, 0.01), "two workers: E[max] = 1.5 mean, so a worker waits 0.5 mean on average"),
    ((4, 0.02), "four workers: (1/2 + 1/3 + 1/4) mean"),
    ((8, 1.0), "eight workers: H_8 - 1 = 1.7179 means"),
)
SEEDED_STEPS, SEEDED_MEAN = 20_000, 0.01


def _harmonic(n):
    return sum(1.0 / k for k in range(1, n + 1))


def _judge_wait(args, got, expected, why):
    n, mean = args
    if not isinstance(got, (int, float, np.floating, np.integer)) or isinstance(got, bool):
        return f"returned {got!r}: return a number of seconds"
    if np.isclose(got, expected, rtol=1e-9, atol=1e-15):
        return None
    if np.isclose(got, _harmonic(n) * mean, rtol=1e-9):
        hint = "that is E[max], the whole step; the wait is what the slowest takes beyond a worker's own delay: E[max] - mean"
    elif n > 1 and np.isclose(got, _harmonic(n) - 1, rtol=1e-9) and mean != 1:
        hint = f"that is H_W - 1 without the mean: multiply by mean = {mean}"
    elif n == 2 and np.isclose(got, mean, rtol=1e-9):
        hint = ("that is one mean, which (W - 1) mean and H_(W-1) mean both give at W = 2; the slowest of 2 takes "
                "H_2 = 1.5 means on average, so a worker waits H_2 - 1 = 0.5 of a mean")
    elif n > 1 and np.isclose(got, _harmonic(n - 1) * mean, rtol=1e-9):
        hint = "that is H_(W-1) mean; the wait is E[max] - mean = (H_W - 1) mean"
    elif n > 1 and np.isclose(got, (n - 1) * mean, rtol=1e-9):
        hint = "(W - 1) mean grows linearly; the maximum of W exponentials grows like the harmonic number H_W"
    elif n > 2 and np.isclose(got, (n - 1) / 2 * mean, rtol=1e-9):
        hint = ("that is (W - 1)/2 mean, as if the workers finished one mean apart and a worker waited for half of "
                "the others; but the gaps shrink: of k workers still running the first finishes mean/k later on "
                "average, so the slowest ends at (1/W + 1/(W-1) + ... + 1) mean = H_W mean and the wait is "
                "(H_W - 1) mean (the two agree only at W = 1 and 2)")
    elif n > 1 and np.isclose(got, np.log(n) * mean, rtol=1e-9):
        hint = "ln(W) mean is H_W - 1 only roughly (H_W ~ ln W + 0.5772); use the harmonic number"
    else:
        hint = why
    return f"returned {got:.6g}, expected {expected:.6g}: {hint}"


def _seeded_wait(comm):
    """The mean wait of SEEDED_STEPS barrier steps with exponential delays, every rank its own seeded draw,
    the slowest of each step found by MPI's Allreduce(MAX); and its standard error."""
    from mpi4py import MPI

    mine = np.random.default_rng([2026, comm.rank]).exponential(SEEDED_MEAN, size=SEEDED_STEPS)
    slowest = np.empty_like(mine)
    comm.Allreduce(mine, slowest, op=MPI.MAX)
    waits = slowest - mine
    total = np.empty(2)
    comm.Allreduce(np.array([waits.sum(), (waits ** 2).sum()]), total, op=MPI.SUM)
    n = SEEDED_STEPS * comm.size
    mean = total[0] / n
    return mean, np.sqrt(max(total[1] / n - mean ** 2, 0.0) / SEEDED_STEPS)  # steps are the independent samples


def _wait_on_rank(comm, expected_wait):
    cases = [(args, (_harmonic(args[0]) - 1) * args[1], why) for args, why in WAIT_CASES]
    problems = _table(expected_wait, cases, lambda i, args: f"expected_wait(n_workers={args[0]}, mean={args[1]})",
                      _judge_wait)
    if _anyone(comm, problems):
        return problems
    measured, error = _seeded_wait(comm)
    got, failure = _call(expected_wait, comm.size, SEEDED_MEAN)
    run = (f"a seeded run of {SEEDED_STEPS:,} barrier steps on {comm.size} ranks (exponential delays of mean "
           f"{1000 * SEEDED_MEAN:g} ms, the slowest found by Allreduce(MAX))")
    if failure:
        return [f"expected_wait({comm.size}, {SEEDED_MEAN}) for {run}: your function {failure}"]
    if abs(got - measured) > 4 * error + 1e-12:
        return [f"{run} waited {1000 * measured:.3f} ms on average (+- {1000 * error:.3f}); your "
                f"expected_wait({comm.size}, {SEEDED_MEAN}) = {1000 * got:.3f} ms is more than 4 standard errors away"]
    return []


@exercise_check(_wait_on_rank)
def check_expected_wait(expected_wait):
    """expected_wait(n_workers, mean) must be the expected time a worker waits at a barrier for the slowest
    of n_workers exponential delays with this mean: (H_n - 1) * mean."""
