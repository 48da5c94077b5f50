"""Secure aggregation with pairwise masks (Bonawitz et al., CCS 2017), on fixed-point integers mod 2^32.

    y = secure_sum(comm, x, seed=1234)     # y: the sum over ranks of x, a new float64 array on every rank

Every rank turns its x into fixed-point integers modulo 2^32 (encode) and adds a mask (masked_vector).
For every pair of ranks i < j there is one random vector m_ij = pair_mask(seed, i, j): rank i adds it,
rank j subtracts it. Each rank's masked vector alone is uniform noise on [0, 2^32), yet in the sum over
all ranks every m_ij appears once with + and once with -, so the masks cancel exactly and the allreduce
of the masked vectors is the sum of the encoded values: whoever adds the vectors up learns the sum and
nothing else.

Fixed point: encode(x) = round(x * 2^F) modulo 2^32 (F = fraction_bits, FRACTION_BITS = 16 by default;
negative numbers wrap around, two's complement); decode reads the total as an int32 and divides by 2^F.
Integer addition modulo 2^32 is exact, so the result is exactly the sum of the rounded values:
  precision  2^-F (about 1.5e-5 for F = 16) per value; rounding moves each value by at most 2^-(F+1),
             so the result is within p * 2^-(F+1) of the float sum over p ranks;
  range      the *sum* must lie in [-2^(31-F), 2^(31-F)), so every rank's |x| must be below
             2^(31-F) / p (for F = 16: 32768 / p). secure_sum refuses larger values (ValueError).

Dropout: ranks in `dropped` act as if they had agreed their masks and then crashed before sending: they
contribute zeros. The survivors' masks shared with a dropped rank then have no partner to cancel them,
and the result is garbage (recover=False). With recover=True each survivor also removes the mask terms
it shares with every dropped rank, so the result is the exact sum over the survivors. (In the real
protocol the server learns those pairwise seeds from Shamir secret shares of the dropped client's key,
held by the survivors.)

This is a simulation of the protocol's arithmetic, not a secure protocol: every rank can derive every
pair's mask from `seed`, so it hides nothing from a rank that wants to look. The real protocol agrees
each pair's key by Diffie-Hellman key exchange, so that only ranks i and j know m_ij.

Cost per rank, for n values: one ring allreduce of 4 bytes per value (2 (p-1)/p * 4n bytes sent), plus
p-1 mask generations of n values (and one more per dropped rank with recover=True), plus two small
pickle-based allgathers that check the arguments.

Input rules: x must be a numpy array (TypeError otherwise) of a real integer or floating dtype
(TypeError), finite and within the range above (ValueError naming the rank); shape, dtype, seed,
fraction_bits, dropped and recover must be the same on every rank (ValueError naming the ranks); seed
a non-negative int, fraction_bits an int in 0..30, dropped some of the ranks 0..p-1 but not all of them.
Every bad call raises on every rank, so no rank is left waiting in the allreduce.
"""
import numpy as np

from .allreduce import allreduce
from .rpc import check_same_on_all_ranks, refuse_on_every_rank

__all__ = ["secure_sum", "encode", "decode", "pair_mask", "pairwise_masks", "masked_vector",
           "FRACTION_BITS"]

FRACTION_BITS = 16  # bits after the binary point: precision 2^-16, sums within [-32768, 32768)


# ----------------------------------------------------------------------------- fixed point

def encode(x, fraction_bits=FRACTION_BITS):
    """round(x * 2^fraction_bits) as uint32, modulo 2^32 (negative numbers wrap: two's complement).

    x must be finite with |x| well below 2^(63 - fraction_bits); only values below 2^(31 - fraction_bits)
    decode back to themselves.
    """
    x = np.asarray(x, dtype=np.float64)
    scaled = np.round(x.reshape(-1) * 2.0 ** fraction_bits)  # flat: 0-d arithmetic would give scalars
    return scaled.astype(np.int64).astype(np.uint32).reshape(x.shape)  # int64 -> uint32 keeps the low 32 bits


def decode(total, fraction_bits=FRACTION_BITS):
    """The uint32 array `total` read as int32 (two's complement), divided by 2^fraction_bits: float64."""
    total = np.asarray(total, dtype=np.uint32)
    return (total.reshape(-1).view(np.int32) / 2.0 ** fraction_bits).reshape(total.shape)


# ----------------------------------------------------------------------------- masks

def pair_mask(seed, i, j, shape):
    """The mask shared by ranks i < j: uint32 numbers uniform on [0, 2^32), the same wherever it is made."""
    rng = np.random.default_rng([seed, i, j])
    return rng.integers(0, 2**32, size=shape, dtype=np.uint32)


def pairwise_masks(rank, size, seed, shape):
    """This rank's total mask: + pair_mask(seed, rank, j) for every j > rank, - pair_mask(seed, j, rank)
    for every j < rank, modulo 2^32. Summed over all ranks the masks cancel to 0 exactly."""
    total = np.zeros(shape, dtype=np.uint32)
    for other in range(size):
        if other > rank:
            total += pair_mask(seed, rank, other, shape)  # uint32 arithmetic wraps modulo 2^32
        elif other < rank:
            total -= pair_mask(seed, other, rank, shape)
    return total


def masked_vector(x, rank, size, seed, fraction_bits=FRACTION_BITS):
    """encode(x) + pairwise_masks(...) (uint32): what a rank sends. Alone it is uniform noise."""
    masked = encode(x, fraction_bits)
    # pairwise_masks is looked up here, at call time, so an exercise can put a learner's version in its
    # place; += works in place, so the result stays an array even for shape ()
    masked += pairwise_masks(rank, size, seed, masked.shape)
    return masked


def _remove_masks_shared_with(masked, rank, dropped, seed):
    """Undo, in place, the terms of this rank's mask that it shares with each dropped rank."""
    for gone in dropped:
        if rank < gone:
            masked -= pair_mask(seed, rank, gone, masked.shape)
        else:
            masked += pair_mask(seed, gone, rank, masked.shape)


# ----------------------------------------------------------------------------- checking the input

def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_ranks(dropped):
    """dropped as a sorted tuple of distinct ints, or None if it is not a collection of ints."""
    try:
        ranks = sorted(set(dropped))
    except TypeError:  # not iterable, unhashable items, or items that do not compare
        return None
    return tuple(int(r) for r in ranks) if all(_is_int(r) for r in ranks) else None


def _check_arguments(comm, x, seed, fraction_bits, dropped, recover):
    """Raise on every rank if the call is bad; return dropped as a sorted tuple of ranks.

    First one allgather makes sure every rank passed the same kind of x and the same settings; after
    that, checks of those raise alike everywhere. Then a second allgather checks each rank's values.
    """
    def comparable(value):  # what check_same_on_all_ranks can compare with == (not an array, say)
        return value if value is None or _is_int(value) or isinstance(value, (bool, str)) else repr(value)

    ranks = _as_ranks(dropped)
    check_same_on_all_ranks(comm, "secure_sum",
                            type=type(x).__name__,
                            shape=getattr(x, "shape", None),
                            dtype=str(x.dtype) if isinstance(x, np.ndarray) else None,
                            seed=comparable(seed), fraction_bits=comparable(fraction_bits),
                            dropped_ranks=ranks if ranks is not None else repr(dropped),
                            recover_flag=comparable(recover))
    p = comm.size
    if not isinstance(x, np.ndarray):
        raise TypeError(f"secure_sum: x must be a numpy array, got {type(x).__name__}; "
                        f"convert it with np.asarray first")
    if x.dtype.kind not in "iuf":
        raise TypeError(f"secure_sum: x must have a real integer or floating dtype, got {x.dtype}")
    if not _is_int(seed):
        raise TypeError(f"secure_sum: seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"secure_sum: seed must be >= 0, got {seed}")
    if not _is_int(fraction_bits) or not 0 <= fraction_bits <= 30:
        raise ValueError(f"secure_sum: fraction_bits must be an int in 0..30, got {fraction_bits!r}")
    if ranks is None:
        raise ValueError(f"secure_sum: dropped must be a collection of ranks (ints), got {dropped!r}")
    if any(not 0 <= r < p for r in ranks):
        raise ValueError(f"secure_sum: dropped names rank(s) {[r for r in ranks if not 0 <= r < p]}, "
                         f"but the ranks are 0..{p - 1}")
    if len(ranks) == p:
        raise ValueError(f"secure_sum: dropped names every rank (0..{p - 1}); at least one must survive")

    # This rank's own values: finite, and small enough that the sum of p of them fits.
    largest = np.max(np.abs(x.astype(np.float64)), initial=0.0)
    limit = 2.0 ** (31 - fraction_bits) / p
    problem = None
    if not np.isfinite(largest):
        problem = "x holds NaN or infinite values"
    elif np.round(largest * 2.0 ** fraction_bits) * p >= 2.0 ** 31:  # |encoded| * p must stay below 2^31
        problem = (f"the largest |value| is {largest:.8g}, but with {p} rank{'s' if p > 1 else ''} and "
                   f"{fraction_bits} fraction bits every |value| must be below 2^(31-F)/p = {limit:.8g} "
                   f"(after rounding to a multiple of 2^-{fraction_bits}), so that the sum fits in 32 bits")
    refuse_on_every_rank(comm, "secure_sum", problem)
    return ranks


# ----------------------------------------------------------------------------- the collective

def secure_sum(comm, x, *, seed, fraction_bits=FRACTION_BITS, dropped=(), recover=True):
    """Return on every rank a new float64 array of x's shape: the sum over ranks of x, within p * 2^-(F+1).

    Each rank sends only masked_vector(x, ...): encode(x) plus its pairwise masks, which cancel in the
    sum. Ranks in `dropped` send zeros, as if they had crashed after agreeing their masks; with
    recover=True the survivors remove the masks they share with them, so the result is the sum over
    the survivors; with recover=False it is garbage. Every rank, dropped or not, must call this, and
    gets the same result.
    """
    dropped = _check_arguments(comm, x, seed, fraction_bits, dropped, recover)
    if comm.rank in dropped:
        masked = np.zeros(x.shape, dtype=np.uint32)  # crashed before sending: nothing arrives from it
    else:
        masked = masked_vector(x, comm.rank, comm.size, seed, fraction_bits)
        if recover:
            _remove_masks_shared_with(masked, comm.rank, dropped, seed)
    # uint32 addition wraps modulo 2^32, exactly the arithmetic the masks need. The shape and dtype
    # were checked above (masked has x's shape, uint32), so allreduce need not check them again.
    total = allreduce(comm, masked, op="sum", algorithm="ring", check=False)
    return decode(total, fraction_bits)
