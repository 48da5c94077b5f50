"""Chapter 07's exercises: top-k with error feedback, the pairwise masks that cancel, the nodes' communicators.

Each is first tried alone on a table of seeded cases, then put in place of the library's function
inside a real run: compressed training, secure_sum, hierarchical_allreduce.
"""
import re

import numpy as np

from .harness import COLLECTIVES, _anyone, _call, _in_place_of, _show, _table, exercise_check
from .training import _OwnComm

# ---------------------------------------------------------------- top-k with error feedback

TOPK_CASES = [(40, 4, 700), (9, 1, 701), (25, 25, 702), (1000, 10, 703)]  # (length, k, seed)
ACCURACY_MARGIN = 0.02  # compressed training must stay within 2 points of uncompressed
TOPK_RUN = dict(model="mlp", epochs=4, batch_size=32, lr=0.2, seed=0)


def _topk_inputs(n, k, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n), rng.normal(size=n) * 0.5, k


def _judge_topk(args, got, before, why):
    """before: copies of (update, residual) taken before the call, to judge against and to see changes."""
    update, residual = before
    if not (np.array_equal(args[0], update) and np.array_equal(args[1], residual)):
        changed = "update" if not np.array_equal(args[0], update) else "residual"
        return (f"changed its argument {changed} in place; leave update and residual as they are and return new "
                f"arrays (corrected = update + residual makes a new one; residual += update does not)")
    k = args[2]
    if not (isinstance(got, (tuple, list)) and len(got) == 3):
        return f"returned {type(got).__name__}; expected a tuple (indices, values, new_residual)"
    indices, values, new_residual = (np.asarray(part) for part in got)
    corrected = update + residual
    if indices.shape != (k,) or values.shape != (k,):
        return f"returned {indices.size} indices and {values.size} values; expected k = {k} of each"
    if indices.dtype.kind not in "iu" or len(set(indices.tolist())) != k or not np.all((indices >= 0) & (indices < update.size)):
        return f"returned indices {_show(indices)}; expected {k} different integer positions in 0..{update.size - 1}"
    chosen = np.sort(np.argsort(-np.abs(corrected), kind="stable")[:k])
    if new_residual.shape != update.shape:
        return f"returned a new residual of shape {new_residual.shape}; expected {update.shape}, like the update"
    if not np.allclose(values, corrected[indices]):
        at = int(np.flatnonzero(~np.isclose(values, corrected[indices]))[0])
        hint = ""
        if np.isclose(values[at], update[indices[at]]):
            right_indices = np.array_equal(np.sort(indices), chosen)
            hint = (" (that is update[index]: send corrected[indices], the values of update + residual)" if right_indices
                    else " (that is the update alone: add the residual first, corrected = update + residual)")
        return (f"sends value {values[at]:.6g} for index {indices[at]}, but update + residual there is "
                f"{corrected[indices[at]]:.6g}{hint}")
    if not np.isclose(np.sort(np.abs(values)).sum(), np.abs(corrected[chosen]).sum()):
        return (f"sent indices {_show(np.sort(indices))}, not the {k} largest |update + residual| "
                f"{_show(chosen)}")
    sent = np.zeros_like(corrected)
    sent[indices] = values
    if not np.allclose(sent + new_residual, corrected):
        at = int(np.flatnonzero(~np.isclose(sent + new_residual, corrected))[0])
        return (f"loses part of the update: at index {at}, sent {sent[at]:.6g} + new residual {new_residual[at]:.6g} "
                f"!= update + residual {corrected[at]:.6g} (the new residual is what was not sent: "
                f"corrected with the sent entries set to 0)")
    return None


def _topk_alone(learner):
    cases = []
    for case in TOPK_CASES:
        update, residual, k = _topk_inputs(*case)
        cases.append(((update, residual, k), (update.copy(), residual.copy()), ""))  # judged against the copies
    return _table(learner, cases, lambda i, args: f"case {i} (k={args[2]} of {args[0].size} values)", _judge_topk)


def _topk_on_rank(comm, learner):
    from .. import compression
    from ..training import train

    problems = _topk_alone(learner)
    if _anyone(comm, problems):
        return problems
    plain = train(comm, "allreduce", **TOPK_RUN)
    try:
        with _in_place_of(compression, "topk_with_error_feedback", learner):
            compressed = train(comm, "allreduce", compression=compression.TopK(0.01), **TOPK_RUN)
    except Exception as exc:  # noqa: BLE001
        return [f"training with TopK(0.01) and your function failed: {type(exc).__name__}: {exc}"]
    if compressed.test_accuracy < plain.test_accuracy - ACCURACY_MARGIN:
        return [f"training with TopK(0.01) and your function reached test accuracy {compressed.test_accuracy:.4f}, "
                f"more than {ACCURACY_MARGIN * 100:.0f} points below uncompressed {plain.test_accuracy:.4f} "
                f"(by epoch: {[round(e['test_accuracy'], 3) for e in compressed.evaluations]})"]
    return []


@exercise_check(_topk_on_rank)
def check_topk_error_feedback(topk_with_error_feedback):
    """topk_with_error_feedback(update, residual, k) must return (indices, values, new_residual): the k entries
    of update + residual largest in magnitude, and what was not sent; then, in place of the library's, training
    with TopK(0.01) must stay within 2 points of uncompressed test accuracy."""


# ---------------------------------------------------------------- the pairwise masks

MASK_CASES = [(7, (1000,)), (8, (3, 5)), (9, (1,))]  # (seed, shape)


def _masks_on_rank(comm, learner):
    from mpi4py import MPI

    from .. import secure_aggregation as sa

    rank, p = comm.rank, comm.size
    for seed, shape in MASK_CASES:
        # the same text on every rank (the report names the ranks), so a problem they share is shown once
        call = f"pairwise_masks(rank, size={p}, seed={seed}, shape={shape})"
        got, error = _call(learner, rank, p, seed, shape)
        problem = None
        if error:
            problem = f"{call}: your function {error}"
        elif not isinstance(got, np.ndarray) or got.dtype != np.uint32 or got.shape != shape:
            problem = (f"{call} returned {type(got).__name__} {getattr(got, 'dtype', '')} {getattr(got, 'shape', '')}; "
                       f"expected a uint32 array of shape {shape} (arithmetic modulo 2^32 wraps in uint32)")
        if _anyone(comm, [problem] if problem else []):
            return [problem] if problem else []
        total = np.empty_like(got)
        comm.Allreduce(got, total, op=MPI.SUM)  # uint32 sums wrap modulo 2^32
        if np.any(total):
            at = int(np.flatnonzero(total.ravel())[0])
            mine = comm.allgather(int(got.ravel()[at]))
            return [f"{call}: the masks of all ranks must sum to 0 modulo 2^32, element {at} sums to "
                    f"{int(total.ravel()[at])} (the ranks' masks there: {mine}). For each pair i < j the lower rank "
                    f"adds pair_mask(seed, i, j) and the higher subtracts the same one"]
        plain = sa.encode(np.full(shape, 0.25))
        if p > 1 and np.any(got + plain == plain):
            at = int(np.flatnonzero((got + plain == plain).ravel())[0])
            problem = (f"{call}: element {at} of the mask is 0, so the masked value there is the plain one: every "
                       f"rank's mask must hide every value (add one pair mask for every other rank)")
        if _anyone(comm, [problem] if problem else []):  # every rank stops here, or none: none waits in the next case
            return [problem] if problem else []
    x = np.random.default_rng(710 + rank).uniform(-3, 3, size=101)
    expected = np.empty_like(x)
    comm.Allreduce(x, expected)
    with _in_place_of(sa, "pairwise_masks", learner):
        try:
            got = sa.secure_sum(comm, x, seed=11)
        except Exception as exc:  # noqa: BLE001
            return [f"secure_sum with your masks failed: {type(exc).__name__}: {exc}"]
    tolerance = p * 2.0 ** -(sa.FRACTION_BITS + 1) + 1e-12
    if not np.allclose(got, expected, rtol=0, atol=tolerance):
        at = int(np.argmax(np.abs(got - expected)))
        return [f"secure_sum with your masks gave element {at} = {got[at]:.6g}, MPI's sum of the plain values is "
                f"{expected[at]:.6g}"]
    return []


@exercise_check(_masks_on_rank)
def check_pairwise_masks(pairwise_masks):
    """pairwise_masks(rank, size, seed, shape) must return this rank's uint32 mask: + pair_mask(seed, rank, j) for
    each j > rank, - pair_mask(seed, j, rank) for each j < rank, modulo 2^32. The masks of all ranks sum to 0, every
    element of each is non-zero (with 2 ranks or more), and secure_sum with them equals MPI's sum."""


# ---------------------------------------------------------------- the nodes' communicators

def _groupings(p):
    """Groupings to try; the last holds the node id -32766, MPI.UNDEFINED in MPICH: an id passed as the colour
    itself (MPICH accepts negative colours) then leaves its ranks out of every node communicator."""
    return [[r // 2 for r in range(p)], [0] * p, list(range(p)), [(r * 7) % 3 + 10 for r in range(p)],
            [5 if r == p - 1 else -1 for r in range(p)], [-32766 if r < (p + 1) // 2 else 0 for r in range(p)]]


UNDEFINED_HINT = (" (this rank's node id -32766 is MPI.UNDEFINED: passed as the colour, it gives MPI.COMM_NULL; "
                  "use the node's position among the sorted ids as the colour)")


def _without_error_stack(error):
    """MPICH's message of an MPI error without its error stack, whose lines hold the addresses of the
    rank's own variables: "Invalid communicator: Null communicator (line 8 ...)", the same text on every rank."""
    return re.sub(r", error stack:\n(?:.*\n)*.*?\w+\(\d+\): ", ": ", error)


class OtherRanksLeft(RuntimeError):
    """Raised in the learner's collective call on the ranks that would wait forever for ranks that left."""


class _Agreeing:
    """The communicator the learner's split_nodes gets: `own` (the learner's duplicate), except that each
    collective call (comm.Split and the like) first agrees with every rank over `side`, the check's
    communicator (one small allgather of a flag): when some ranks have already left the learner's function
    (it raised there, e.g. on MPI.COMM_NULL, or returned early), the call would wait for them forever, so
    it raises OtherRanksLeft instead, naming them. The check calls leave() on every rank once the learner's
    function is over; it takes part in those agreements until every rank has left. Cost: one allgather per
    collective call of the learner, and one or two more per call of its function. (A class, not a closure:
    it travels to the engines by reference.)"""

    AGREED = COLLECTIVES | {"Split", "Split_type", "Dup", "Create", "Create_group"}

    def __init__(self, own, side):
        self.own, self._side = own, side

    def __getattr__(self, name):
        attribute = getattr(self.own, name)
        if name not in self.AGREED:
            return attribute

        def collective(*args, **kwargs):
            left = [rank for rank, out in enumerate(self._side.allgather(True)) if not out]
            if left:
                raise OtherRanksLeft(f"comm.{name} here would wait forever: rank{'s' if len(left) > 1 else ''} "
                                     f"{', '.join(map(str, left))} had already left your function (raised or "
                                     f"returned there); every rank must make the same collective calls")
            return attribute(*args, **kwargs)
        return collective

    def leave(self):
        """Called on every rank once the learner's function is over: wait until every rank is over too."""
        while any(self._side.allgather(False)):  # each rank's flag: inside a collective call of the learner
            pass

    def unwrapped(self, value):
        """The learner's result with this wrapper (returned as is, e.g. as the one node's communicator) as own."""
        return self.own if value is self else value


def _split_problem(comm, nodes, got):
    """What is wrong with the learner's (node_comm, leaders_comm) for `nodes`, on this rank, or None."""
    from mpi4py import MPI

    if not (isinstance(got, tuple) and len(got) == 2):
        return f"returned {type(got).__name__}; expected a tuple (node_comm, leaders_comm)"
    node_comm, leaders_comm = got
    mine = [r for r in range(comm.size) if nodes[r] == nodes[comm.rank]]
    if not isinstance(node_comm, MPI.Comm) or node_comm == MPI.COMM_NULL:
        hint = UNDEFINED_HINT if node_comm == MPI.COMM_NULL and nodes[comm.rank] == MPI.UNDEFINED else ""
        return f"returned node_comm = {node_comm!r}; expected a communicator of this rank's node, ranks {mine}{hint}"
    members = MPI.Group.Translate_ranks(node_comm.Get_group(), list(range(node_comm.size)), comm.Get_group())
    if list(members) != mine:
        return (f"node_comm holds ranks {list(members)} (in its rank order) of comm; this rank's node {nodes[comm.rank]} "
                f"is ranks {mine}, in comm's order (comm.Split with one colour per node, key=comm.rank)")
    leaders = [min(r for r in range(comm.size) if nodes[r] == node) for node in sorted(set(nodes))]
    if comm.rank in leaders:
        if not isinstance(leaders_comm, MPI.Comm) or leaders_comm == MPI.COMM_NULL:
            return f"this rank leads node {nodes[comm.rank]}, but leaders_comm is {leaders_comm!r}"
        members = MPI.Group.Translate_ranks(leaders_comm.Get_group(), list(range(leaders_comm.size)), comm.Get_group())
        if sorted(members) != leaders:
            return f"leaders_comm holds ranks {sorted(members)} of comm; expected the leaders {leaders}, rank 0 of each node"
    elif leaders_comm is not None:
        got_text = "MPI.COMM_NULL" if isinstance(leaders_comm, MPI.Comm) and leaders_comm == MPI.COMM_NULL else repr(leaders_comm)
        return (f"this rank is not the leader of its node (rank {mine[0]} is), so leaders_comm must be None; got "
                f"{got_text} (split with colour MPI.UNDEFINED, which gives MPI.COMM_NULL, and return None)")
    return None


def _split_alone(comm, learner_comm, learner, nodes):
    """The problem of the learner's split_nodes(learner_comm, nodes) on this rank, or None; frees what it made."""
    from mpi4py import MPI

    got, error = _call(learner, learner_comm, nodes)
    learner_comm.leave()
    if error:
        hint = UNDEFINED_HINT if nodes[comm.rank] == MPI.UNDEFINED and "OtherRanksLeft" not in error else ""
        return f"split_nodes(comm, {nodes}): your function {_without_error_stack(error)}{hint}"
    if isinstance(got, tuple):
        got = tuple(learner_comm.unwrapped(part) for part in got)
    problem = _split_problem(comm, nodes, got)
    if isinstance(got, tuple) and len(got) == 2:
        for part in got:  # after judging: free what the learner's Split made (not COMM_NULL, not comm)
            if isinstance(part, MPI.Comm) and part != MPI.COMM_NULL and part not in (comm, learner_comm.own):
                try:
                    part.Free()
                except MPI.Exception:
                    pass
    return problem and f"split_nodes(comm, {nodes}) {problem}"


def _split_on_rank(comm, own, learner):
    """comm carries the check's calls and the agreements; own, a duplicate, the learner's Split calls."""
    from .. import allreduce as ar

    learner_comm = _Agreeing(own, comm)
    for nodes in _groupings(comm.size):
        problem = _split_alone(comm, learner_comm, learner, nodes)
        if _anyone(comm, [problem] if problem else []):
            return [problem] if problem else []
    for nodes in _groupings(comm.size):
        x = np.random.default_rng(720 + comm.rank).integers(-100, 100, size=comm.size + 3)
        expected = np.empty_like(x)
        comm.Allreduce(x, expected)
        run = f"hierarchical_allreduce(comm, x, nodes={nodes}) with your split_nodes"
        try:
            with _in_place_of(ar, "split_nodes", learner):
                got = ar.hierarchical_allreduce(learner_comm, x, nodes=nodes)
            problem = None if np.array_equal(got, expected) else \
                f"{run} gave {_show(got)}, MPI's Allreduce {_show(expected)}"
        except Exception as exc:  # noqa: BLE001
            problem = f"{run} failed: {type(exc).__name__}: {exc}"
        learner_comm.leave()
        if _anyone(comm, [problem] if problem else []):
            return [problem] if problem else []
    return []


@exercise_check(_OwnComm(_split_on_rank))
def check_split_nodes(split_nodes):
    """split_nodes(comm, nodes) must return (node_comm, leaders_comm): the ranks of this rank's node in comm's
    order, and the communicator of the node leaders (rank 0 of each node) on leaders, None elsewhere; then
    hierarchical_allreduce with it must equal MPI's Allreduce for several groupings."""
