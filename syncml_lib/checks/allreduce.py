"""Chapter 03's exercises: the ring's reduce-scatter and allgather, and recursive doubling.

Each runs on arrays of several lengths (RING_LENGTHS) through a communicator that records every
array sent, so a wrong result is explained by the first wrong message (step, destination, data).
"""
import numpy as np

from .harness import _anyone, _call, _show, exercise_check

RING_LENGTHS = (12, 13, 3, 1001)  # 13 and 1001 do not divide evenly; 3 is fewer elements than 4 ranks


def _integer_inputs(trial, size, length):
    """Every rank's array for one trial: small integers stored as float64, so every sum is exact."""
    rng = np.random.default_rng(3000 + trial)
    return rng.integers(-9, 10, size=(size, length)).astype(np.float64)


def _recording(comm):
    """A TracedComm that also keeps a copy of every array sent, so a check can say which step went wrong."""
    from ..trace import TracedComm

    class Recording(TracedComm):
        def __init__(self, comm):
            super().__init__(comm)
            self.sent = []  # (step, dest, copy of the data)
            self.blocking_sends = 0

        def Send(self, buf, dest, tag=0):
            self.sent.append((self.steps, dest, np.array(buf, copy=True)))
            self.blocking_sends += 1
            return super().Send(buf, dest, tag)

        def Isend(self, buf, dest, tag=0):
            self.sent.append((self.steps, dest, np.array(buf, copy=True)))
            return super().Isend(buf, dest, tag)

        def Sendrecv(self, sendbuf, dest, *args, **kwargs):
            self.sent.append((self.steps, dest, np.array(sendbuf, copy=True)))
            return super().Sendrecv(sendbuf, dest, *args, **kwargs)

    return Recording(comm)


def _mpi_total(comm, mine):
    """The reference answer: MPI's own Allreduce (sum) of this rank's array."""
    total = np.empty_like(mine)
    comm.Allreduce(mine, total)
    return total


BLOCKING_SEND = ("used a blocking comm.Send: when every rank sends before it receives, a message too large "
                 "for MPI to buffer deadlocks the ring (chapter 03, 'A ring with blocking Send then Recv'); "
                 "exchange with comm.Sendrecv instead")


def _first_wrong_message(sent, expected):
    """Compare the messages a rank sent with the (dest, data, what) it should have sent, step by step."""
    for step, (want_dest, want, what) in enumerate(expected):
        if step >= len(sent):
            return f"step {step}: sent nothing; expected to send {what} to rank {want_dest}"
        _, dest, data = sent[step]
        right_data = data.shape == want.shape and np.array_equal(data, want)
        if right_data and dest != want_dest:
            return f"step {step}: sent the right data ({what}) to rank {dest}, but it should go to rank {want_dest}"
        if not right_data:
            return (f"step {step}: sent {_show(data)} to rank {dest}; expected {what} = {_show(want)} "
                    f"to rank {want_dest}")
    return None


def _run_trials(comm, learner, one_trial):
    """one_trial(comm, learner, xs) for each length in RING_LENGTHS (xs: every rank's array); the
    problems found, each prefixed with its length. All ranks stop after the first trial with one."""
    problems = []
    for trial, length in enumerate(RING_LENGTHS):
        problem = one_trial(comm, learner, _integer_inputs(trial, comm.size, length))
        if problem:
            problems.append(f"length {length}: {problem}")
        if _anyone(comm, problems):
            break
    return problems


def _wrong_values(what, got, want, sent, expected_messages, hint):
    """Explain a wrong result: the first wrong element, then the first wrong message (or the hint)."""
    i = int(np.flatnonzero(~(got == want))[0])
    why = _first_wrong_message(sent, expected_messages)
    return (f"{what} element {i} is {got[i]:g}, expected {want[i]:g} (MPI.Allreduce). "
            + (f"First wrong message: {why}" if why else f"Every message was right: {hint}"))


NOT_IN_PLACE = ("replaced entries of the list `chunks` instead of changing them in place, so the buffer they "
                "are views of never changed: write into the chunk (`chunk += incoming`, or receive straight into "
                "it), do not assign `chunks[i] = ...`")


def _still_views(chunks, buffer):
    """Are the learner's chunks still the views of `buffer` they were given?"""
    return all(c.size == 0 or np.shares_memory(c, buffer) for c in chunks)


def _call_on_chunks(comm, ring_phase, buffer, prepare=None):
    """Run a learner's ring phase on chunks that are views of `buffer` (after prepare(chunks), if
    given), through a recording comm. Returns (recording, the chunks of buffer afterwards, problem):
    problem says why the call itself is wrong (it raised, used a blocking Send, or rebound chunks)."""
    chunks = np.array_split(buffer, comm.size)
    if prepare:
        prepare(chunks)
    recording = _recording(comm)
    _, error = _call(ring_phase, recording, chunks)
    problem = (f"your function {error}" if error else BLOCKING_SEND if recording.blocking_sends
               else None if _still_views(chunks, buffer) else NOT_IN_PLACE)
    return recording, np.array_split(buffer, comm.size), problem


def _reduce_scatter_trial(comm, reduce_scatter, xs):
    p, r = comm.size, comm.rank
    total = np.array_split(_mpi_total(comm, xs[r].copy()), p)
    recording, chunks, problem = _call_on_chunks(comm, reduce_scatter, xs[r].copy())
    mine = (r + 1) % p
    if problem:
        return problem
    if np.array_equal(chunks[mine], total[mine]):
        return None
    expected_messages = []
    for step in range(p - 1):
        c = (r - step) % p
        contributors = sorted((r - k) % p for k in range(step + 1))
        want = np.array_split(xs[contributors].sum(axis=0), p)[c]
        expected_messages.append(((r + 1) % p, want, f"chunk {c} summed over ranks {contributors}"))
    return _wrong_values(f"chunks[{mine}] should end as the sum over all ranks, but its", chunks[mine], total[mine],
                         recording.sent, expected_messages, "add what arrives into the chunk it belongs to.")


@exercise_check(_run_trials, _reduce_scatter_trial)
def check_ring_reduce_scatter(reduce_scatter):
    """reduce_scatter(comm, chunks) must leave chunks[(rank + 1) % p] summed over all ranks."""


def _allgather_trial(comm, allgather, xs):
    p, r = comm.size, comm.rank
    total = np.array_split(_mpi_total(comm, xs[r].copy()), p)

    def as_the_reduce_scatter_left_it(chunks):  # only chunk (r + 1) % p is complete, the rest garbage
        chunks[(r + 1) % p][:] = total[(r + 1) % p]

    recording, chunks, problem = _call_on_chunks(comm, allgather, np.full(xs.shape[1], np.nan),
                                                 as_the_reduce_scatter_left_it)
    if problem:
        return problem
    wrong = [c for c in range(p) if not np.array_equal(chunks[c], total[c])]
    if not wrong:
        return None
    expected_messages = [((r + 1) % p, total[(r + 1 - step) % p], f"the complete chunk {(r + 1 - step) % p}")
                         for step in range(p - 1)]
    return _wrong_values(f"chunks[{wrong[0]}]", chunks[wrong[0]], total[wrong[0]], recording.sent,
                         expected_messages, "receive each one into the chunk it belongs to.")


@exercise_check(_run_trials, _allgather_trial)
def check_ring_allgather(allgather):
    """allgather(comm, chunks), starting with only chunks[(rank + 1) % p] complete, must complete them all."""


def _recursive_doubling_trial(comm, recursive_doubling, xs):
    p, r = comm.size, comm.rank
    total = _mpi_total(comm, xs[r].copy())
    mine = xs[r].copy()
    recording = _recording(comm)
    got, error = _call(recursive_doubling, recording, mine)
    if error:
        return f"your function {error}"
    if recording.blocking_sends:
        return BLOCKING_SEND
    if not np.array_equal(mine, xs[r]):
        return "your function changed its input array; work on a copy"
    if not isinstance(got, np.ndarray) or got.shape != total.shape:
        return f"returned {type(got).__name__} of shape {np.shape(got)}, expected an array of shape {total.shape}"
    if np.array_equal(got, total):
        return None
    expected_messages = []
    for step in range(p.bit_length() - 1):
        group = [k for k in range(p) if k >> step == r >> step]  # the ranks summed before this step
        expected_messages.append((r ^ (1 << step), xs[group].sum(axis=0), f"the sum over ranks {group}"))
    return _wrong_values("the result's", got, total, recording.sent, expected_messages,
                         "add what you receive into your running sum.")


def _power_of_two_trials(comm, recursive_doubling, one_trial):
    if comm.size & (comm.size - 1):
        return [f"this check needs a power-of-two number of ranks, not {comm.size}"]
    return _run_trials(comm, recursive_doubling, one_trial)


@exercise_check(_power_of_two_trials, _recursive_doubling_trial)
def check_recursive_doubling(recursive_doubling):
    """recursive_doubling(comm, x) must return the sum of all ranks' x (p a power of two), x unchanged."""
