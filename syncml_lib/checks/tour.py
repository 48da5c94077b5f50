"""Chapter 00's exercise: a global mean over ranks that hold different numbers of values."""
import numpy as np

from .harness import _anyone, _call, _CountingComm, exercise_check

GLOBAL_MEAN_TRIALS = 4


def global_mean_inputs(trial, size):
    """Every rank's local values for one trial: uneven lengths; from trial 1 on, one rank has none."""
    rng = np.random.default_rng(1000 + trial)
    lengths = rng.integers(1, 7, size=size)
    if trial > 0 and size > 1:
        lengths[trial % size] = 0
    return [rng.normal(loc=trial, scale=3.0, size=k) for k in lengths]


def _global_mean_on_rank(comm, global_mean):
    problems = []
    for trial in range(GLOBAL_MEAN_TRIALS):
        everyone = global_mean_inputs(trial, comm.size)
        mine = everyone[comm.rank].copy()
        expected = np.concatenate(everyone).mean()
        lengths = [len(v) for v in everyone]
        counting = _CountingComm(comm)
        got, error = _call(global_mean, counting, mine)
        if error:
            problems.append(f"trial {trial} (lengths by rank {lengths}): your function {error}")
        elif len(counting.collectives) != 1:
            problems.append(f"trial {trial}: your function made {len(counting.collectives)} collective calls "
                            f"({', '.join(counting.collectives) or 'none'}); the exercise asks for exactly one")
        elif not np.array_equal(mine, everyone[comm.rank]):
            problems.append(f"trial {trial}: your function changed its input array")
        elif not np.isscalar(got) and np.shape(got) != ():
            problems.append(f"trial {trial}: returned {got!r}, expected one number")
        elif not np.isclose(float(got), expected, rtol=1e-12, atol=1e-12):
            local = f"{mine.mean():.6g}" if len(mine) else "undefined (no values)"
            problems.append(f"trial {trial} (lengths by rank {lengths}): returned {float(got):.6g}, "
                            f"expected {expected:.6g} (this rank's own mean is {local})")
        if _anyone(comm, problems):
            break
    return problems


@exercise_check(_global_mean_on_rank)
def check_global_mean(global_mean):
    """global_mean(comm, local_values) must return the mean of all ranks' values, on every rank."""
