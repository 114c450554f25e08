"""Paired statistics on hand-made (repeats × cases) numbers with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_ext.evaluation.statistics import (
    MIN_CASES,
    PairedComparison,
    bootstrap_ci,
    case_means,
    compare,
    holm,
    holm_family,
    mean_and_std,
    paired_differences,
    starred,
    wilcoxon_p,
    worst_repeat_ratio,
)


def test_differences_are_method_minus_baseline_and_need_equal_2d_shapes():
    assert paired_differences([[0.75, 0.5]], [[0.5, 0.5]]).tolist() == [[0.25, 0.0]]
    with pytest.raises(ValueError, match="same \\(repeats, cases\\) shape"):
        paired_differences([[1.0, 2.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="same \\(repeats, cases\\) shape"):
        paired_differences([1.0, 2.0], [1.0, 2.0])


def test_constant_difference_gives_a_zero_width_interval_at_that_constant():
    result = compare(np.full((3, MIN_CASES), 0.8), np.full((3, MIN_CASES), 0.55))
    assert result.mean == pytest.approx(0.25)
    assert result.low == pytest.approx(0.25, abs=1e-12) and result.high == pytest.approx(0.25, abs=1e-12)
    assert result.excludes_zero and (result.n_pairs, result.n_cases) == (3 * MIN_CASES, MIN_CASES)


def test_one_case_gives_the_mean_and_neither_interval_nor_star():
    for method, baseline in (([[0.8]], [[0.6]]), ([[0.8], [0.7], [0.9]], [[0.6], [0.6], [0.6]])):
        result = compare(method, baseline)  # one case, in one or in three repeats
        assert result.mean == pytest.approx(0.2)
        assert result.too_few_cases and math.isnan(result.low) and math.isnan(result.high)
        assert not result.excludes_zero and result.p_value == 1.0
        assert not starred(result, holm_family([result])[0])


def test_an_interval_needs_min_cases_distinct_cases_not_pairs():
    rng = np.random.default_rng(3)
    baseline = rng.uniform(0.5, 0.9, size=(4, MIN_CASES))
    method = baseline + 0.2
    below = compare(method[:, 1:], baseline[:, 1:])  # 4 × (MIN_CASES − 1) pairs, MIN_CASES − 1 cases
    assert below.n_pairs >= MIN_CASES and below.too_few_cases and math.isnan(below.low)
    at = compare(method, baseline)
    assert not at.too_few_cases and at.low == pytest.approx(0.2) and at.excludes_zero
    nan_case = method.copy()
    nan_case[:, 0] = math.nan  # a case without any pair does not count
    assert compare(nan_case, baseline).too_few_cases
    assert not compare(method[:, :1], baseline[:, :1], min_cases=1).too_few_cases
    with pytest.raises(ValueError, match="min_cases must be at least 1, got 0"):
        compare(method, baseline, min_cases=0)


def test_one_repeat_is_the_ordinary_case_bootstrap_with_the_same_seed():
    differences = np.array([[0.3, -0.1, 0.05, 0.2, -0.4, 0.15, 0.0, 0.25, -0.05, 0.1]])
    indices = np.random.default_rng(7).integers(0, 10, size=(500, 10))
    expected = np.percentile(differences[0][indices].mean(axis=1), [5.0, 95.0])
    assert bootstrap_ci(differences, n_resamples=500, confidence=0.9, seed=7) == pytest.approx(tuple(expected))


def test_crossed_bootstrap_resamples_repeats_too():
    # every case has the same difference within a repeat: only resampling repeats can move the mean
    differences = np.array([[0.0] * 5, [1.0] * 5])
    low, high = bootstrap_ci(differences, n_resamples=2000)
    assert (low, high) == (0.0, 1.0)


def test_bootstrap_is_reproducible_and_depends_on_the_seed():
    differences = np.random.default_rng(0).normal(size=(3, 12))
    assert bootstrap_ci(differences, seed=1) == bootstrap_ci(differences, seed=1)
    assert bootstrap_ci(differences, seed=1) != bootstrap_ci(differences, seed=2)


def test_nan_pairs_are_left_out_and_counted():
    method = np.array([[0.9, math.nan, 0.7, 0.6], [0.8, 0.5, math.nan, math.nan]])
    baseline = np.array([[0.7, 0.2, 0.6, math.nan], [0.6, math.nan, math.nan, 0.1]])
    result = compare(method, baseline, n_resamples=200, min_cases=1)
    # valid pairs: (0,0) 0.2, (0,2) 0.1, (1,0) 0.2 -> cases 0 and 2
    assert (result.n_pairs, result.n_cases) == (3, 2)
    assert result.mean == pytest.approx(0.5 / 3)
    assert 0.1 - 1e-12 <= result.low <= result.high <= 0.2 + 1e-12
    assert case_means(paired_differences(method, baseline)) == pytest.approx([0.2, math.nan, 0.1, math.nan],
                                                                            nan_ok=True)


def test_all_nan_gives_nan_and_no_pairs():
    result = compare(np.full((2, 3), math.nan), np.zeros((2, 3)))
    assert (result.n_pairs, result.n_cases) == (0, 0)
    assert all(math.isnan(v) for v in (result.mean, result.low, result.high, result.p_value))
    assert not result.excludes_zero


def test_wilcoxon_exact_two_sided_p():
    assert wilcoxon_p([[1.0, 2.0, 3.0, 4.0, 5.0]]) == pytest.approx(0.0625)
    assert wilcoxon_p([[-1.0, 2.0, 3.0, 4.0, 5.0]]) == pytest.approx(0.125)


def test_wilcoxon_uses_one_value_per_case_averaged_over_repeats():
    # per-case means are 1..5 (exact p 0.0625); ten independent pairs would give a much smaller p
    differences = np.array([[0.0, 1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0, 6.0]])
    assert wilcoxon_p(differences) == pytest.approx(0.0625)


def test_wilcoxon_all_zero_differences_no_cases_and_one_case():
    assert wilcoxon_p(np.zeros((2, 4))) == 1.0
    assert math.isnan(wilcoxon_p(np.full((1, 3), math.nan)))
    assert wilcoxon_p([[0.3]]) == 1.0


def test_interval_finds_a_clear_shift_and_not_pure_noise():
    rng = np.random.default_rng(42)
    baseline = rng.uniform(0.5, 0.9, size=(3, 40))
    shifted = compare(baseline + 0.1 + rng.normal(0.0, 0.02, size=baseline.shape), baseline)
    assert shifted.low < 0.1 < shifted.high and shifted.excludes_zero and shifted.p_value < 1e-6
    noise = compare(baseline + rng.normal(0.0, 0.05, size=baseline.shape), baseline)
    assert noise.low < 0.0 < noise.high and not noise.excludes_zero and noise.p_value > 0.05


def test_identical_methods_on_20_cases_are_not_starred():
    rng = np.random.default_rng(5)
    baseline = rng.uniform(0.5, 0.9, size=(1, 20))
    same = compare(baseline, baseline)
    assert (same.low, same.high, same.p_value) == (0.0, 0.0, 1.0) and not starred(same, holm_family([same])[0])


def test_a_planted_difference_on_20_cases_is_starred():
    rng = np.random.default_rng(6)
    baseline = rng.uniform(0.5, 0.9, size=(1, 20))
    planted = compare(baseline + 0.1 + rng.normal(0.0, 0.02, size=baseline.shape), baseline)
    nulls = [compare(baseline, baseline) for _ in range(5)]
    adjusted = holm_family([planted, *nulls])
    assert planted.excludes_zero and adjusted[0] < 0.05 and starred(planted, adjusted[0])
    assert not any(starred(r, p) for r, p in zip(nulls, adjusted[1:]))


def test_holm_on_hand_made_p_values():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> 0.06 (never below the one before)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # unadjusted all four are below 0.05; after Holm only the two smallest
    assert (holm([0.01, 0.04, 0.03, 0.005]) < 0.05).tolist() == [True, False, False, True]
    assert holm([0.01, math.nan, 0.04]) == pytest.approx([0.02, math.nan, 0.04], nan_ok=True)  # NaN: not a test
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02, 0.02, 0.02]) == pytest.approx([0.06, 0.06, 0.06])
    assert holm([]).size == 0 and holm([0.03]) == pytest.approx([0.03])
    with pytest.raises(ValueError, match="p_values must lie in \\[0, 1\\], got \\[1.5\\]"):
        holm([0.01, 1.5])
    with pytest.raises(ValueError, match="p_values must be a flat list"):
        holm([[0.01, 0.02]])


def test_holm_family_leaves_out_comparisons_with_too_few_cases():
    small = PairedComparison(0.3, math.nan, math.nan, 6, 2, 0.01)
    large = [PairedComparison(0.1, 0.05, 0.15, 20, 20, 0.02), PairedComparison(0.1, 0.01, 0.2, 20, 20, 0.04)]
    assert holm_family([small, *large]) == pytest.approx([math.nan, 0.04, 0.04], nan_ok=True)


def test_a_star_needs_an_interval_that_excludes_zero_and_a_small_adjusted_p():
    excluding = PairedComparison(0.1, 0.05, 0.15, 20, 20, 0.001)
    containing = PairedComparison(0.1, -0.05, 0.15, 20, 20, 0.001)
    assert starred(excluding, 0.01)
    assert not starred(excluding, 0.06) and not starred(containing, 0.01)


def test_mean_and_std_over_repeats():
    assert mean_and_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02), 2))
    mean, std, n = mean_and_std([0.5, math.nan])
    assert (mean, n) == (0.5, 1) and math.isnan(std)


def test_worst_repeat_ratio_by_hand():
    # repeat 0: (0.2 + 0.4) / (0.6 + 0.6) = 0.5; repeat 1: 0.8 / 0.8 = 1; repeat 2: only case 1 is paired, 0.3 / 0.9
    # (the baseline's 0.1 on case 0 does not count); repeat 3: the baseline's mean is 0 (no ratio)
    method = [[0.2, 0.4], [0.8, 0.8], [np.nan, 0.3], [0.5, 0.5]]
    baseline = [[0.6, 0.6], [0.8, 0.8], [0.1, 0.9], [0.0, 0.0]]
    assert worst_repeat_ratio(method, baseline) == (pytest.approx(1 / 3), 2)
    assert worst_repeat_ratio(method[:2], baseline[:2]) == (pytest.approx(0.5), 0)
    assert worst_repeat_ratio([[0.9, 0.9]], [[0.6, 0.6]]) == (pytest.approx(1.5), 0)
    ratio, repeat = worst_repeat_ratio([[np.nan]], [[0.5]])
    assert np.isnan(ratio) and repeat == -1
