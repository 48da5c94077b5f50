"""Gradient compression: fewer bytes per step, and what it costs in accuracy.

    total = TopK(fraction=0.01).sum(comm, grads)        # about the sum over ranks of grads, on every rank
    train(comm, "allreduce", compression=TopK(0.01), **settings)   # chapter 06's trainer, compressed

A compressor's sum(comm, arrays) takes this rank's arrays (name -> array) and returns, on every
rank, the same approximation of their sum over all ranks. With n float64 values per rank and p ranks:

    method            what a rank sends                 exchanged with          bytes sent per rank
    none              the n values                      ring allreduce          2 (p-1)/p 8n
    TopK(fraction)    its k largest |values|: k         ring allgather          (p-1) 12k
                      (int32 index, float64 value)
    Int8()            n int8 and one float64 scale      ring allgather          (p-1) (n + 8)
    Sign()            n sign bits and one scale         ring allgather          (p-1) (n/8 + 8)
    LowRank(rank=r)   per a x b matrix: P = M Q (a x r),  ring allreduce          2 (p-1)/p 8 r (a + b)
                      then Q' = M^T P (b x r); vectors as they are                  per matrix, + vectors

Why an allgather for the first three: the sum of p sparse vectors is not sparse (up to p k
non-zeros), and quantized numbers with each rank's own scale cannot be added as they are: the ring's
partial sums would have to be sent dense or re-compressed at every hop. So every rank sends its
compressed vector to all others, which decompress and add (the payload grows with p). Low-rank
composes with allreduce because it is linear once Q is shared: sum_r (M_r Q) = (sum_r M_r) Q.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): each rank keeps what it did not send,
the residual e, and adds it to its next update: sent = C(v + e), e = (v + e) - sent. Nothing is
lost, only delayed; without it top-k and sign bias the gradient and training stalls or degrades.
The compressors keep their residuals between calls; train() calls reset(params) before a run.
"""
from dataclasses import dataclass

import numpy as np

from .allreduce import allreduce, ring_allgather
from .training.loop import flatten, unflatten

__all__ = ["TopK", "Int8", "Sign", "LowRank", "COMPRESSORS", "get_compressor", "top_k",
           "topk_with_error_feedback", "allgather_bytes"]


# ----------------------------------------------------------------------------- the two small ideas

def top_k(vector, k):
    """(indices, values): the k entries of a 1-D vector with the largest |value|, indices sorted.
    np.argpartition finds them in O(n), without sorting the whole vector."""
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= vector.size):
        raise ValueError(f"top_k: k must be an integer from 1 to the vector's length {vector.size}, got {k!r}")
    indices = np.sort(np.argpartition(np.abs(vector), vector.size - k)[vector.size - k:])
    return indices, vector[indices]


def topk_with_error_feedback(update, residual, k):
    """Top-k with error feedback, one rank's step: (indices, values, new residual).

    corrected = update + residual (what this rank owes the sum); send its top k entries; the new
    residual is corrected with those k entries set to 0 (what is still owed, sent in later steps).
    update and residual are 1-D float arrays of the same length; neither is modified.
    """
    corrected = update + residual
    indices, values = top_k(corrected, k)
    new_residual = corrected.copy()
    new_residual[indices] = 0.0
    return indices, values, new_residual


def allgather_bytes(comm, payload):
    """Every rank's payload (a uint8 array of the same length on every rank) as rows in rank order,
    with chapter 03's ring allgather: (p-1) messages of len(payload) bytes per rank."""
    p = comm.size
    rows = np.empty((p, payload.size), dtype=np.uint8)
    rows[(comm.rank + 1) % p] = payload  # ring_allgather: rank r starts with chunk r + 1
    ring_allgather(comm, list(rows))
    return np.roll(rows, -1, axis=0)  # row (q + 1) % p holds rank q's payload


# ----------------------------------------------------------------------------- the compressors

class _Compressor:
    """What every compressor shares: residuals for error feedback, a flat vector's sum through an
    allgather of payloads, and reset(params) before a run.

    If compress raises or returns a payload of the wrong size on some rank, that rank sends a payload
    of NaN instead and notes the problem in self.problem: the sum is NaN on every rank, so the trainer
    stops every rank at the same step (training/loop.py) instead of leaving the others waiting."""
    problem = None

    def reset(self, params):
        """Forget the residuals (and warm starts); check the compressor fits params. Before a run."""
        self.n = sum(np.size(value) for value in params.values())
        self.residual = np.zeros(self.n)
        self.problem = None

    def sum(self, comm, arrays):
        """About sum over ranks of arrays (name -> array), the same on every rank. Collective."""
        if getattr(self, "residual", None) is None or self.residual.size != sum(np.size(a) for a in arrays.values()):
            self.reset(arrays)
        size = self.payload_bytes()
        try:
            payload = self.compress(flatten(arrays))
            if payload.dtype != np.uint8 or payload.size != size:
                raise ValueError(f"the payload has {payload.size} bytes, expected {size}")
        except Exception as error:  # noqa: BLE001 - every rank stops on the NaN, and says why
            self.problem = self.problem or f"{type(self).__name__}.compress raised {type(error).__name__}: {error}"
            payload = np.full(size, 0xFF, dtype=np.uint8)  # NaN as float64, -1 as int32
        total = sum(self.decompress(row) for row in allgather_bytes(comm, payload))
        return unflatten(total, arrays)


@dataclass
class TopK(_Compressor):
    """Send the k largest |entries|, k = round(fraction * n) or given (error feedback keeps the rest
    for later steps)."""
    fraction: float = 0.01
    error_feedback: bool = True
    k: int = None

    def reset(self, params):
        super().reset(params)
        if self.k is None:
            if not (isinstance(self.fraction, (float, int)) and 0 < self.fraction <= 1):
                raise ValueError(f"TopK: fraction must be in (0, 1], got {self.fraction!r}")
            self.k_used = max(1, round(self.fraction * self.n))
        elif not (isinstance(self.k, int) and 1 <= self.k <= self.n):
            raise ValueError(f"TopK: k must be an integer from 1 to the vector's length, {self.n}; got {self.k!r}")
        else:
            self.k_used = self.k

    def compress(self, vector):
        if self.error_feedback:
            indices, values, self.residual = topk_with_error_feedback(vector, self.residual, self.k_used)
        else:
            indices, values = top_k(vector, self.k_used)
        indices, values = np.asarray(indices), np.asarray(values, dtype=np.float64)
        if indices.shape != (self.k_used,) or values.shape != (self.k_used,):
            raise ValueError(f"expected {self.k_used} indices and values, got shapes {indices.shape}, {values.shape}")
        if indices.size and not (0 <= indices.min() and indices.max() < self.n):
            raise ValueError(f"an index is outside 0 .. {self.n - 1}")
        return np.concatenate([indices.astype(np.int32).view(np.uint8), values.view(np.uint8)])

    def payload_bytes(self):
        return 12 * self.k_used  # an int32 index and a float64 value each

    def decompress(self, payload):
        indices = payload[:4 * self.k_used].view(np.int32)
        dense = np.zeros(self.n)
        dense[indices] = payload[4 * self.k_used:].view(np.float64)
        return dense


@dataclass
class Int8(_Compressor):
    """Round every entry to one of 255 levels of this rank's scale max|v| / 127 (8 bits each)."""
    error_feedback: bool = False

    def compress(self, vector):
        corrected = vector + self.residual
        scale = float(np.max(np.abs(corrected), initial=0.0)) / 127 or 1.0
        levels = np.clip(np.round(corrected / scale), -127, 127).astype(np.int8)
        if self.error_feedback:
            self.residual = corrected - levels * scale
        return np.concatenate([levels.view(np.uint8), np.array([scale]).view(np.uint8)])

    def payload_bytes(self):
        return self.n + 8  # an int8 per value, and the scale

    def decompress(self, payload):
        return payload[:self.n].view(np.int8) * payload[self.n:].view(np.float64)[0]


@dataclass
class Sign(_Compressor):
    """Send one bit per entry, its sign, and one scale, mean |v| (signSGD with error feedback)."""
    error_feedback: bool = True

    def compress(self, vector):
        corrected = vector + self.residual
        scale = float(np.mean(np.abs(corrected)))
        signs = corrected >= 0
        if self.error_feedback:
            self.residual = corrected - np.where(signs, scale, -scale)
        return np.concatenate([np.packbits(signs), np.array([scale]).view(np.uint8)])

    def payload_bytes(self):
        return (self.n + 7) // 8 + 8  # a bit per value, and the scale

    def decompress(self, payload):
        signs = np.unpackbits(payload[:-8], count=self.n).astype(bool)
        scale = payload[-8:].view(np.float64)[0]
        return np.where(signs, scale, -scale)


@dataclass
class LowRank(_Compressor):
    """PowerSGD (Vogels et al. 2019): each gradient matrix M (a x b) is sent as two thin matrices,
    with one step of power iteration warm-started from the last step's Q (b x r, the same on every rank):

        1. P_r = M_r Q on every rank; P = allreduce sum of P_r       (a x r numbers)
        2. P = orthonormal columns of P (QR)
        3. Q_r = M_r^T P; Q = allreduce sum of Q_r                    (b x r numbers)
        4. the sum over ranks is about P Q^T; rank r's residual is M_r - P Q_r^T

    Both reductions are sums, so any allreduce does them. Vectors (biases) are summed as they are.
    """
    rank: int = 2
    error_feedback: bool = True
    seed: int = 0

    def reset(self, params):
        super().reset(params)
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LowRank: rank must be a positive integer, got {self.rank!r}")
        rng = np.random.default_rng(self.seed)
        self.residuals = {name: np.zeros(np.shape(value)) for name, value in params.items()}
        self.Q = {name: rng.standard_normal((np.shape(value)[1], min(self.rank, *np.shape(value))))
                  for name, value in params.items() if np.ndim(value) == 2}

    def sum(self, comm, arrays):
        if getattr(self, "residuals", None) is None or set(self.residuals) != set(arrays):
            self.reset(arrays)
        matrices = [name for name in arrays if name in self.Q]
        M = {name: arrays[name] + self.residuals[name] for name in matrices}
        P = self._allreduce(comm, {name: M[name] @ self.Q[name] for name in matrices})
        P = {name: np.linalg.qr(P[name])[0] for name in matrices}
        Q_mine = {name: M[name].T @ P[name] for name in matrices}
        vectors = {name: value for name, value in arrays.items() if name not in self.Q}
        summed = self._allreduce(comm, {**Q_mine, **vectors})
        total = dict(vectors)
        for name in matrices:
            self.Q[name] = summed[name]
            total[name] = P[name] @ summed[name].T
            if self.error_feedback:
                self.residuals[name] = M[name] - P[name] @ Q_mine[name].T
        total.update({name: summed[name] for name in vectors})
        return {name: total[name] for name in arrays}

    @staticmethod
    def _allreduce(comm, arrays):
        return unflatten(allreduce(comm, flatten(arrays), check=False), arrays)


COMPRESSORS = {"topk": TopK, "int8": Int8, "sign": Sign, "lowrank": LowRank}


def get_compressor(spec):
    """None, a compressor, or a name of COMPRESSORS (with its defaults) -> a compressor or None."""
    if spec is None or isinstance(spec, _Compressor):
        return spec
    if isinstance(spec, str) and spec in COMPRESSORS:
        return COMPRESSORS[spec]()
    raise ValueError(f"unknown compression {spec!r}; valid: None, {', '.join(COMPRESSORS)}, "
                     f"or a compressor such as TopK(fraction=0.01)")
