"""costmodel.py: the formulas, the choice they lead to, and the fits that measure their constants."""
import math

import numpy as np
import pytest

from syncml_lib import costmodel
from syncml_lib.costmodel import choose, fit_line, fit_params, predict
from syncml_lib.mpirun import run

ALGORITHMS = ["naive", "tree", "recursive_doubling", "ring", "rabenseifner"]


def test_formulas_by_hand():
    a, b, g, n = 1.0, 0.01, 0.001, 1000  # per message: a + n b = 11; reducing n bytes: n g = 1
    assert predict("naive", n, 4, a, b, g) == pytest.approx(6 * 11 + 3 * 1)
    assert predict("tree", n, 4, a, b, g) == pytest.approx(4 * 11 + 2 * 1)
    assert predict("tree", n, 5, a, b, g) == pytest.approx(6 * 11 + 3 * 1)
    assert predict("recursive_doubling", n, 4, a, b, g) == pytest.approx(2 * 12)
    assert predict("recursive_doubling", n, 5, a, b, g) == pytest.approx(2 * 12 + 2 * 11 + 1)
    assert predict("ring", n, 4, a, b, g) == pytest.approx(6 + 2 * 0.75 * 10 + 0.75 * 1)
    assert predict("ring", n, 5, a, b, g) == pytest.approx(8 + 2 * 0.8 * 10 + 0.8 * 1)
    assert predict("rabenseifner", n, 4, a, b, g) == pytest.approx(4 + 2 * 0.75 * 10 + 0.75 * 1)
    assert predict("rabenseifner", n, 6, a, b, g) == pytest.approx(4 + 2 * 0.75 * 10 + 0.75 * 1 + 2 * 11 + 1)
    for name in ALGORITHMS:
        assert predict(name, n, 1, a, b, g) == 0


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(ValueError, match="recursive_doubling"):
        predict("bogus", 8, 4, 1e-6, 1e-9)


@pytest.mark.parametrize("p", [2, 3, 4, 5, 8, 13, 64])
def test_predictions_grow_with_size_and_latency(p):
    sizes = [0, 8, 1 << 10, 1 << 20, 1 << 30]
    for name in ALGORITHMS:
        times = [predict(name, n, p, 1e-6, 1e-9, 1e-10) for n in sizes]
        assert all(t0 < t1 for t0, t1 in zip(times, times[1:])), name
        assert predict(name, 1000, p, 2e-6, 1e-9) > predict(name, 1000, p, 1e-6, 1e-9)


@pytest.mark.parametrize("p", [3, 4, 5, 8, 16, 100])
def test_ring_loses_small_and_wins_large_against_recursive_doubling(p):
    rng = np.random.default_rng(p)
    for _ in range(100):
        alpha, beta = 10 ** rng.uniform(-7, -3), 10 ** rng.uniform(-11, -8)
        gamma = 10 ** rng.uniform(-12, -9) * rng.integers(0, 2)  # sometimes 0
        small, large = 1, 1e6 * alpha / beta  # large enough that latency no longer matters
        ring, rd = (lambda n, name: predict(name, n, p, alpha, beta, gamma)), "recursive_doubling"
        assert ring(small, "ring") > ring(small, rd)
        assert ring(large, "ring") < ring(large, rd)


def test_choose_picks_latency_for_small_and_bandwidth_for_large():
    params = dict(alpha=1e-5, beta=1e-9, gamma=1e-10)
    for p in (2, 4, 8, 16):
        assert choose(8, p, params) == "recursive_doubling"
        assert choose(1 << 28, p, params) in ("ring", "rabenseifner")
    assert choose(1 << 28, 6, params) == "ring"  # the fold costs Rabenseifner two full messages
    assert choose(8, 1) == "naive"  # nothing to do: every algorithm costs 0, the first wins


def test_default_params_choose_sensibly_on_four_ranks():
    assert all(costmodel.DEFAULT_PARAMS[k] > 0 for k in ("alpha", "beta", "gamma"))
    for nbytes in (8, 64, 1 << 10):
        assert choose(nbytes, 4) in ("naive", "tree", "recursive_doubling")
    for nbytes in (8 << 20, 64 << 20):
        assert choose(nbytes, 4) in ("ring", "rabenseifner")


def test_fit_line_recovers_alpha_and_beta():
    rng = np.random.default_rng(0)
    sizes = np.array([8, 64, 1 << 10, 8 << 10, 64 << 10, 1 << 20, 8 << 20])
    for alpha, beta in [(2e-6, 1e-10), (5e-5, 3e-9), (1e-7, 1e-11)]:
        times = (alpha + beta * sizes) * rng.uniform(0.98, 1.02, size=sizes.size)  # 2% noise
        got_alpha, got_beta = fit_line(sizes, times)
        assert got_alpha == pytest.approx(alpha, rel=0.05)
        assert got_beta == pytest.approx(beta, rel=0.05)


def test_fit_params_recovers_the_constants_of_its_own_model():
    truth = dict(alpha=3e-5, beta=2e-10, gamma=5e-10)
    timings = {(name, n): predict(name, n, 4, **truth)
               for name in ALGORITHMS for n in (8, 1 << 10, 64 << 10, 1 << 20, 8 << 20)}
    got = fit_params(timings, 4, gamma=truth["gamma"])
    for key, value in truth.items():
        assert got[key] == pytest.approx(value, rel=1e-6)
    assert choose(1 << 20, 4, got) == choose(1 << 20, 4, truth)


def measure(comm):
    from syncml_lib.costmodel import fit_alpha_beta, measure_gamma

    alpha, beta = fit_alpha_beta(comm, sizes=(8, 1 << 10, 64 << 10, 1 << 20), repeat=5)
    return alpha, beta, measure_gamma(1 << 20, repeat=3)


def test_fit_alpha_beta_measures_the_same_plausible_numbers_on_every_rank():
    results = run(measure, 3, timeout=60)
    alpha, beta, gamma = results[0]
    assert all((a, b) == (alpha, beta) for a, b, _ in results)
    assert 0 <= alpha < 1e-2 and not math.isnan(alpha)  # seconds per message
    assert 0 < beta < 1e-6  # seconds per byte: more than 1 MB/s
    assert 0 < gamma < 1e-6


def test_on_cores_scales_per_byte_costs_with_the_share_of_a_core_each_rank_gets():
    from syncml_lib.costmodel import on_cores

    params = dict(alpha=1e-5, beta=4e-10, gamma=2e-10)
    fitted = dict(ranks=4, cores=2)  # two ranks per core when the constants were measured
    assert on_cores(params, 4, 2, fitted) == params
    assert on_cores(params, 3, 2, fitted) == dict(alpha=1e-5, beta=3e-10, gamma=1.5e-10)  # 2/3 of a core each
    alone = on_cores(params, 2, 2, fitted)  # one rank per core: bytes move twice as fast
    assert alone == dict(alpha=1e-5, beta=2e-10, gamma=1e-10)
    assert on_cores(params, 8, 2, fitted)["beta"] == 8e-10
    assert on_cores(params, 1, 2, fitted) == alone  # a rank never gets more than one core


def test_hierarchical_by_hand_and_its_limits():
    intra, inter = dict(alpha=1.0, beta=0.0), dict(alpha=10.0, beta=0.0)
    # 4 nodes of 8: a tree of 3 rounds each way inside (6 a_in), a ring of 4 leaders (6 a_out)
    assert costmodel.predict_hierarchical(100, 4, 8, intra, inter) == pytest.approx(6 * 1.0 + 6 * 10.0)
    # one rank per node: the flat ring; one node: the tree alone
    for n in (8, 1 << 20):
        link = dict(alpha=3e-6, beta=1e-9)
        assert costmodel.predict_hierarchical(n, 16, 1, link, link) == pytest.approx(predict("ring", n, 16, **link))
        assert costmodel.predict_hierarchical(n, 1, 8, link, link) == pytest.approx(predict("tree", n, 8, **link))
    nets = costmodel.NETWORKS
    # latency-bound: the hierarchy saves 2(p - N) slow latencies; bandwidth-bound with many nodes: little
    small = predict("ring", 8, 1024, **nets["10 GbE"]) / costmodel.predict_hierarchical(8, 128, 8, nets["NVLink 3"], nets["10 GbE"])
    assert 7 < small < 8.1


def test_predict_step_and_amdahl():
    # 240 examples on 3 ranks: the largest shard is 80; on 2 cores each rank gets 2/3 of one
    t = costmodel.predict_step("ring", 3, 240, 1e-5, 1000, alpha=1e-6, beta=1e-9, overhead=1e-4, cores=2)
    assert t == pytest.approx(80 * 1e-5 * 1.5 + predict("ring", 1000, 3, 1e-6, 1e-9) + 1e-4)
    ps = costmodel.predict_step("ps", 4, 30, 1e-5, 1000, alpha=1e-6, beta=1e-9)  # 3 workers compute
    assert ps == pytest.approx(10 * 1e-5 + costmodel.predict_ps(1000, 3, 1, 1e-6, 1e-9))
    assert costmodel.amdahl(1, 0.3) == pytest.approx(1.0)
    assert costmodel.amdahl(4, 0.0) == pytest.approx(4.0)
    assert costmodel.amdahl(10**9, 0.1) == pytest.approx(10.0, rel=1e-6)      # never more than 1/s
    assert predict("ring", 100, np.int64(4), 1.0, 0.0) == predict("ring", 100, 4, 1.0, 0.0)  # numpy rank counts


def test_gustafson_is_the_weak_scaling_law_and_agrees_with_amdahl_on_the_same_run():
    assert costmodel.gustafson(1, 0.3) == pytest.approx(1.0)
    assert costmodel.gustafson(4, 0.0) == pytest.approx(4.0)       # nothing serial: p times the work
    assert costmodel.gustafson(4, 1.0) == pytest.approx(1.0)       # all serial: no more work done
    assert costmodel.gustafson(10, 0.1) == pytest.approx(0.1 + 0.9 * 10)
    for p in (2, 16, 10**6):                                         # unbounded, efficiency never below 1 - s
        assert costmodel.gustafson(p, 0.1) / p >= 0.9
    assert costmodel.gustafson(10**6, 0.1) > 1 / 0.1                 # where Amdahl's bound 1/s would stop it
    # one run of p processors, serial time s and parallel time 1 - s: on one processor it takes s + (1 - s) p,
    # of which the serial part is the fraction s / (s + (1 - s) p); Amdahl with that fraction gives the same speedup
    for p, s in ((4, 0.2), (64, 0.05)):
        single_fraction = s / (s + (1 - s) * p)
        assert costmodel.amdahl(p, single_fraction) == pytest.approx(costmodel.gustafson(p, s))


def test_resnet50_compute_is_three_forward_passes_at_two_flops_per_multiply_add():
    flop = costmodel.training_flop_per_example(costmodel.RESNET50["forward_multiply_adds"])
    assert flop == pytest.approx(24.54e9)                            # 3 x 2 x 4.09e9: about 12 G multiply-adds
    assert costmodel.RESNET50["gradient_bytes"] == 4 * costmodel.RESNET50["parameters"] > 100e6
    assert 60 * flop / costmodel.A100_TF32_FLOPS == pytest.approx(9.44e-3, rel=1e-3)   # 60 images on one A100, at peak
