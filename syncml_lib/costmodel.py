"""The alpha-beta-gamma cost model of AllReduce, and how to measure its constants.

Sending a message of m bytes takes alpha + m beta seconds (alpha: latency, beta: seconds per byte,
1 / bandwidth); reducing m bytes takes m gamma seconds. For each algorithm in allreduce.py,
predict() adds up the steps on the critical path:

    t = predict("ring", nbytes=8 << 20, p=4, alpha=5e-6, beta=1e-9, gamma=3e-10)
    fastest = choose(nbytes=8 << 20, p=4)            # what allreduce(..., algorithm="auto") runs
    alpha, beta = fit_alpha_beta(comm)               # a ping-pong between ranks 0 and 1
    t_ps = predict_ps(nbytes=8 << 20, workers=3, servers=1, alpha=5e-6, beta=1e-9)  # parameter server
    t_h = predict_hierarchical(8 << 20, nodes=4, per_node=8, intra=NETWORKS["NVLink 3"], inter=NETWORKS["10 GbE"])
    t_step = predict_step("ring", p=4, batch=32, seconds_per_example=2e-5, nbytes=76888, alpha=3.4e-5, beta=5.3e-10)
    amdahl(p=4, serial_fraction=0.1), gustafson(p=4, serial_fraction=0.1)   # strong and weak scaling's laws
    RESNET50["gradient_bytes"], training_flop_per_example(RESNET50["forward_multiply_adds"]) / A100_TF32_FLOPS
"""
import math
import time
from types import MappingProxyType

import numpy as np

__all__ = ["on_cores", "predict", "predict_ps", "predict_hierarchical", "predict_step", "amdahl", "gustafson", "NETWORKS", "RESNET50",
           "A100_TF32_FLOPS", "training_flop_per_example", "ps_over_ring", "choose", "fit_line", "fit_params", "fit_alpha_beta", "measure_gamma", "DEFAULT_PARAMS"]

# Measured on the course machine (2 cores, 4 ranks, MPICH 5 from its PyPI wheel, shared memory) with
#     make bench BENCH=allreduce BENCH_ARGS="--fit"
# which fits alpha and beta (least squares, relative errors) to the median times of
# recursive_doubling, ring and rabenseifner at 8 B .. 64 MB, with gamma from measure_gamma().
# alpha is large because it is the cost of one *step* of our Python code on 4 ranks sharing
# 2 cores, not of one bare message; a ping-pong (fit_alpha_beta) measures a few microseconds.
#
# Read-only, because allreduce(algorithm="auto") remembers its choices: pass other constants to
# choose(nbytes, p, params) instead.
DEFAULT_PARAMS = MappingProxyType(dict(alpha=3.4e-5, beta=5.3e-10, gamma=5e-11))


def _log2_floor(p):
    return p.bit_length() - 1


def _fold(nbytes, alpha, beta, gamma, p):
    """The cost of folding p ranks into a power of two and back: 0 if p is one already."""
    if p == 1 << _log2_floor(p):
        return 0.0
    return 2 * (alpha + nbytes * beta) + nbytes * gamma


def predict(algorithm, nbytes, p, alpha, beta, gamma=0.0):
    """Predicted seconds for an allreduce of nbytes bytes on p ranks. With q = 2^floor(log2 p):

    naive               2(p-1)(alpha + n beta) + (p-1) n gamma         rank 0 serializes everything
    tree                2 ceil(log2 p)(alpha + n beta) + ceil(log2 p) n gamma
    recursive_doubling  log2 q (alpha + n beta + n gamma) + fold
    ring                2(p-1) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma
    rabenseifner        2 log2 q alpha + 2 (q-1)/q n beta + (q-1)/q n gamma + fold

    where fold = 2(alpha + n beta) + n gamma if p is not a power of two (the extra ranks hand their
    data to a partner and get the result back), else 0.
    """
    n, a, b, g, p = nbytes, alpha, beta, gamma, int(p)
    if p == 1:
        return 0.0
    if algorithm == "naive":
        return 2 * (p - 1) * (a + n * b) + (p - 1) * n * g
    if algorithm == "tree":
        rounds = math.ceil(math.log2(p))
        return 2 * rounds * (a + n * b) + rounds * n * g
    q = 1 << _log2_floor(p)
    if algorithm == "recursive_doubling":
        return _log2_floor(p) * (a + n * b + n * g) + _fold(n, a, b, g, p)
    if algorithm == "ring":
        return 2 * (p - 1) * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * g
    if algorithm == "rabenseifner":
        return 2 * _log2_floor(p) * a + 2 * (q - 1) / q * n * b + (q - 1) / q * n * g + _fold(n, a, b, g, p)
    raise ValueError(f"predict: unknown algorithm {algorithm!r}; "
                     f"valid algorithms are naive, tree, recursive_doubling, ring, rabenseifner")


def predict_ps(nbytes, workers, servers, alpha, beta, gamma=0.0, mode="bsp"):
    """Predicted seconds of one parameter-server step (pull + push), as parameter_server.py runs it.

    With n bytes of parameters, W workers and S servers, each server, one request at a time,
    receives W gradient slices and sends W parameter slices of n/S bytes plus 4 control messages
    per worker (a request and a reply for the pull and for the push), and makes passes over its
    slice: a copy of the parameters for each pull (W), and to apply the gradients, in BSP the mean
    of the W gradients (W + 1) and the update (lr * mean, then -=: 2), in SSP and ASP the update of
    each gradient alone (lr / W * grad, then -=: 2 W). Each worker does S pulls and S pushes one after
    another, moves 2n bytes and puts the slices together (1 pass over n). A step takes the busier
    one's time; in BSP the servers also wait, once a step, while the last worker they answered puts
    its parameters together (n gamma), because its push completes the step:

        server  4 W alpha + 2 W n/S beta + P n/S gamma      P = 2W + 3 (bsp), 3W (ssp, asp)
        worker  4 S alpha + 2 n beta + n gamma
        t = max(server + n gamma, worker) in BSP, max(server, worker) in SSP and ASP

    gamma is the cost of one pass over fresh memory by the server (see bench/ps.py: it needs more
    than measure_gamma's in-place add). In ASP and SSP the step is the steady-state pace: the server
    still serves every pull and push, so it bounds the step in the same way.
    """
    n, w, s, a, b, g = nbytes, workers, servers, alpha, beta, gamma
    if w < 1 or s < 1:
        raise ValueError(f"predict_ps needs at least one worker and one server, got workers={w}, servers={s}")
    passes = {"bsp": 2 * w + 3, "ssp": 3 * w, "asp": 3 * w}.get(mode)
    if passes is None:
        raise ValueError(f"predict_ps: unknown mode {mode!r}; valid modes are bsp, ssp, asp")
    server = 4 * w * a + 2 * w * n / s * b + passes * n / s * g
    worker = 4 * s * a + 2 * n * b + n * g
    if mode == "bsp":
        server += n * g
    return max(server, worker)


FITTED_ON = dict(ranks=4, cores=2)  # where DEFAULT_PARAMS were measured (see above)


def on_cores(params, ranks, cores, fitted_on=FITTED_ON):
    """params (fitted with fitted_on["ranks"] busy ranks on fitted_on["cores"] cores) for `ranks` busy
    ranks on `cores` cores. Moving and adding bytes is CPU work, and the operating system shares the
    cores fairly among the busy ranks: each gets cores / ranks of a core, and never more than one.
    So beta and gamma scale with max(1, ranks / cores); alpha, a per-step cost measured per
    configuration where it matters, is kept. (3 ranks on 2 cores: 1.5, measured ring 8 MB among 3
    workers 3.7-4.7 ms against 4.7 ms predicted; the most loaded core, ceil(3/2) = 2, said 6.3 ms.)"""
    share = lambda r, c: max(1.0, r / c)  # noqa: E731
    factor = share(ranks, cores) / share(fitted_on["ranks"], fitted_on["cores"])
    return dict(params, beta=params["beta"] * factor, gamma=params.get("gamma", 0.0) * factor)


def ps_over_ring(nbytes, workers, servers, alpha, beta, gamma=0.0, mode="bsp"):
    """predict_ps / predict("ring", p=workers): how many times slower the parameter server is.

    The fair comparison is a ring allreduce among the W workers only (the same gradients, the
    same workers; the S server ranks are not needed). For n >> alpha / beta and gamma = 0 it
    tends to (2 W / S) / (2 (W-1) / W) = W^2 / (S (W-1)): 4.5 for W=3, S=1; 2 for W=2, S=2. With one worker there is nothing to reduce
    (the ring takes 0 s): the ratio is then inf.
    """
    ring = predict("ring", nbytes, workers, alpha, beta, gamma)
    ps = predict_ps(nbytes, workers, servers, alpha, beta, gamma, mode)
    return ps / ring if ring > 0 else math.inf


ALGORITHMS = ("naive", "tree", "recursive_doubling", "ring", "rabenseifner")


def choose(nbytes, p, params=DEFAULT_PARAMS):
    """The algorithm with the smallest predicted time (ties go to the first in ALGORITHMS).

    params holds alpha, beta and optionally gamma, e.g. the dict fit_params returns.
    """
    return min(ALGORITHMS, key=lambda name: predict(name, nbytes, p, **params))


def fit_line(sizes, times):
    """Fit times = alpha + beta * sizes by least squares on relative errors; return (alpha, beta).

    Relative errors (weights 1/time) keep the tiny times of small messages, which carry alpha,
    from being drowned by the large ones, which carry beta.
    """
    sizes, times = np.asarray(sizes, dtype=float), np.asarray(times, dtype=float)
    beta, alpha = np.polyfit(sizes, times, 1, w=1 / times)
    return float(alpha), float(beta)


def fit_params(timings, p, gamma=0.0):
    """Fit alpha and beta to measured allreduce times {(algorithm, nbytes): seconds} on p ranks.

    gamma is given (measure it with measure_gamma: it is hard to tell apart from beta in
    allreduce times). predict() is linear in alpha and beta, so this is one least-squares solve,
    on relative errors like fit_line. Returns dict(alpha=..., beta=..., gamma=gamma) for choose().
    """
    keys = list(timings)
    times = np.array([timings[k] for k in keys])
    reducing = np.array([predict(name, nbytes, p, 0, 0, gamma) for name, nbytes in keys])
    A = np.array([[predict(name, nbytes, p, 1, 0), predict(name, nbytes, p, 0, 1)] for name, nbytes in keys])
    (alpha, beta), *_ = np.linalg.lstsq(A / times[:, None], 1 - reducing / times, rcond=None)
    return dict(alpha=float(alpha), beta=float(beta), gamma=gamma)


def fit_alpha_beta(comm, sizes=(8, 64, 1 << 10, 8 << 10, 64 << 10, 1 << 20, 4 << 20), repeat=20):
    """Ping-pong between ranks 0 and 1 and fit alpha, beta to the half round-trip times.

    For each size, rank 0 sends a buffer to rank 1 and rank 1 sends it back, `repeat` times; the
    median half round trip is one sample. The other ranks wait in a sleeping loop, so they do not
    steal the cores. Collective; every rank returns the same (alpha, beta).
    """
    if comm.size < 2:
        raise ValueError("fit_alpha_beta needs at least 2 ranks")
    samples = []
    if comm.rank < 2:
        other = 1 - comm.rank
        for size in sizes:
            buf = np.zeros(size, dtype=np.uint8)
            halves = []
            for i in range(repeat + 2):  # the first two are warm-up
                start = time.perf_counter()
                if comm.rank == 0:
                    comm.Send(buf, dest=other)
                    comm.Recv(buf, source=other)
                else:
                    comm.Recv(buf, source=other)
                    comm.Send(buf, dest=other)
                halves.append((time.perf_counter() - start) / 2)
            samples.append(np.median(halves[2:]))
    done = comm.Ibarrier()
    while not done.Test():
        time.sleep(1e-3)
    alpha, beta = fit_line(sizes, samples) if comm.rank == 0 else (None, None)
    return comm.bcast((alpha, beta), root=0)


def measure_gamma(nbytes=8 << 20, repeat=10):
    """Seconds per byte of np.add(a, b, out=a) on float64 arrays of nbytes bytes (local, no MPI)."""
    a, b = np.ones(nbytes // 8), np.ones(nbytes // 8)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.add(a, b, out=a)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / a.nbytes


# ----------------------------------------------------------------------------- past one machine (chapter 07)

# Links to project onto, {alpha (s per message), beta (s per byte)}. Bandwidths are the nominal data
# rates of the standards and datasheets: 10 GbE 10 Gb/s (IEEE 802.3ae); InfiniBand HDR 200 Gb/s per 4x
# port (InfiniBand Trade Association); NVLink 3 300 GB/s per direction per A100 GPU (NVIDIA A100
# datasheet: 600 GB/s total). Latencies are typical one-way MPI small-message times, an assumption of
# the right order, not a measurement: about 1 us over InfiniBand with RDMA (the OSU osu_latency example
# in QLogic's InfiniPath user guide prints 1.06 us at 0 bytes), tens of us through the TCP stack over
# Ethernet (30 us assumed), a few us for a GPU-to-GPU NVLink transfer launched by NCCL (5 us assumed).
NETWORKS = MappingProxyType({
    "10 GbE": MappingProxyType(dict(alpha=30e-6, beta=1 / 1.25e9)),
    "InfiniBand HDR": MappingProxyType(dict(alpha=1e-6, beta=1 / 25e9)),
    "NVLink 3": MappingProxyType(dict(alpha=5e-6, beta=1 / 300e9)),
})


# ResNet-50 (He et al. 2016) as torchvision builds it (torchvision.models.resnet50, ResNet50_Weights.IMAGENET1K_V1:
# num_params 25,557,032, GFLOPS 4.09 for one 224 x 224 image forward; that count, like He et al.'s Table 1, counts a
# multiply-add once). Its float32 gradient is 4 bytes per parameter.
RESNET50 = MappingProxyType(dict(parameters=25_557_032, forward_multiply_adds=4.09e9, gradient_bytes=4 * 25_557_032))
# A stated compute rate: NVIDIA A100 datasheet, peak TF32 Tensor Core 156 TFLOPS (dense; a multiply-add counts as
# 2 FLOPs there). Training reaches a fraction of a peak, so compute times made with it are lower bounds.
A100_TF32_FLOPS = 156e12


def training_flop_per_example(forward_multiply_adds):
    """FLOPs (a multiply-add = 2, as datasheets count) of one example's forward and backward pass:
    3 x 2 x forward_multiply_adds. The backward pass costs about twice the forward: each layer computes
    the gradient of its input and the gradient of its weights, each a product the size of the forward's.
    ResNet-50: 3 x 2 x 4.09e9 = 24.5e9 FLOPs, the "about 12 GFLOP" usually quoted when a multiply-add counts once."""
    return 3 * 2 * forward_multiply_adds


def predict_hierarchical(nbytes, nodes, per_node, intra, inter, gamma=0.0):
    """Seconds for allreduce.hierarchical_allreduce: N = nodes nodes of g = per_node ranks; intra and
    inter are dicts with alpha and beta of the links inside a node and between nodes.

        2 ceil(log2 g) (a_in + n b_in) + ceil(log2 g) n gamma       tree reduce, then broadcast, inside
        + predict("ring", n, N, a_out, b_out, gamma)                ring among the N leaders

    The flat ring on all p = N g ranks for comparison is predict("ring", n, p, **inter): each of its
    2(p-1) steps waits for the messages that cross a node boundary, so every step pays the slow link."""
    rounds = math.ceil(math.log2(per_node)) if per_node > 1 else 0
    inside = 2 * rounds * (intra["alpha"] + nbytes * intra["beta"]) + rounds * nbytes * gamma
    return inside + predict("ring", nbytes, nodes, inter["alpha"], inter["beta"], gamma)


def predict_step(mechanism, p, batch, seconds_per_example, nbytes, alpha, beta, gamma=0.0, overhead=0.0,
                 cores=None):
    """Seconds per step of chapter 06's data-parallel training on p ranks, global batch `batch`:

        compute   ceil(batch / c) * seconds_per_example    c = p ranks compute (ps: p - 1 workers)
                  * max(1, p / cores) with `cores` given    (p ranks sharing fewer cores)
        exchange  predict(mechanism, nbytes, p, ...) for an allreduce algorithm, or
                  predict_ps(nbytes, p - 1, 1, ...) for "ps" (one server)
        + overhead (the step's fixed cost in Python: checks, bookkeeping)

    The largest shard sets the pace, hence the ceil. Everything but the compute is what does not
    shrink with p: Amdahl's serial part, which here even grows with p. With `cores`, pass alpha,
    beta and gamma through on_cores(params, p, cores) too."""
    if mechanism == "ps":
        workers = p - 1
        exchange = predict_ps(nbytes, workers, 1, alpha, beta, gamma)
    else:
        workers = p
        exchange = predict(mechanism, nbytes, p, alpha, beta, gamma)
    shared = max(1.0, p / cores) if cores else 1.0
    return math.ceil(batch / workers) * seconds_per_example * shared + exchange + overhead


def amdahl(p, serial_fraction):
    """Amdahl's law: the speedup on p processors of a job whose serial_fraction cannot be parallelized,
    1 / (s + (1 - s) / p); it never exceeds 1 / s."""
    return 1.0 / (serial_fraction + (1.0 - serial_fraction) / p)


def gustafson(p, serial_fraction):
    """Gustafson's law, the law of weak scaling: if a fraction s of a run on p processors is serial and the
    rest is p processors' share of p times the work, one processor would take s + (1 - s) p times as long.
    That scaled speedup, s + (1 - s) p, grows without bound; the efficiency (scaled speedup / p) is
    1 - s + s / p, never below 1 - s. (Amdahl fixes the work and finds the speedup bounded by 1 / s.)"""
    return serial_fraction + (1.0 - serial_fraction) * p
