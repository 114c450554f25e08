"""Paired statistics on hand-made (repeats × cases) numbers with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_ext.evaluation.statistics import (
    bootstrap_ci,
    case_means,
    compare,
    mean_and_std,
    paired_differences,
    wilcoxon_p,
)


def test_differences_are_method_minus_baseline_and_need_equal_2d_shapes():
    assert paired_differences([[0.75, 0.5]], [[0.5, 0.5]]).tolist() == [[0.25, 0.0]]
    with pytest.raises(ValueError, match="same \\(repeats, cases\\) shape"):
        paired_differences([[1.0, 2.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="same \\(repeats, cases\\) shape"):
        paired_differences([1.0, 2.0], [1.0, 2.0])


def test_constant_difference_gives_a_zero_width_interval_at_that_constant():
    result = compare(np.full((3, 7), 0.8), np.full((3, 7), 0.55))
    assert result.mean == pytest.approx(0.25)
    assert result.low == pytest.approx(0.25, abs=1e-12) and result.high == pytest.approx(0.25, abs=1e-12)
    assert result.excludes_zero and (result.n_pairs, result.n_cases) == (21, 7)


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
    result = compare(method, baseline, n_resamples=200)
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


def test_mean_and_std_over_repeats():
    assert mean_and_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02), 2))
    mean, std, n = mean_and_std([0.5, math.nan])
    assert (mean, n) == (0.5, 1) and math.isnan(std)
