"""How many test cases does the study's paired bootstrap interval need? Its coverage at n = 2…20 (…40) cases.

For every n and every distribution below, draws ``--datasets`` data sets of n paired differences (one repeat,
as a study with ``--repeats 1``) from a distribution whose mean is known, computes the interval exactly as the
study report does (:func:`nnunet_ext.evaluation.statistics.bootstrap_ci`: percentile bootstrap, 95 %, with
``--resamples`` resamples and the data set's index as seed) and counts how often it contains the true mean.
A nominal 95 % interval should cover it in 95 % of the data sets; where it covers it less often, an interval
that excludes 0 claims more than the data support. Prints a markdown table, the chosen minimum and writes JSON.

Distributions (the percentile interval of a mean moves with location and scale, so their units do not matter):

- ``normal``: standard normal;
- ``skewed``: exponential with rate 1, minus 1 (skewness 2: most cases change a little, a few a lot);
- ``failures``: standard normal, but with probability 0.1 a case loses 10 more (a model that misses a region
  on one case in ten, as the CPU evidence's ET at seed 2).

The minimum: the smallest n from which coverage reaches ``TARGETS`` (90 % for ``normal``, 85 % for ``skewed``
differences) at that n and at every larger n tested; also printed: the n from which both reach 90 %.

    OMP_NUM_THREADS=1 python benchmarks/bootstrap_coverage.py --datasets 5000 --resamples 2000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np

from nnunet_ext.evaluation.statistics import CONFIDENCE, bootstrap_ci

FAILURE_RATE, FAILURE_LOSS = 0.1, 10.0
# distribution -> coverage the minimum must reach from there on
TARGETS = {"normal": 0.90, "skewed": 0.85}
STRICT_TARGETS = {"normal": 0.90, "skewed": 0.90}
CASES = [*range(2, 21), 25, 30, 40]


def _failures(rng: np.random.Generator, size: int) -> np.ndarray:
    """Standard normal differences, minus ``FAILURE_LOSS`` with probability ``FAILURE_RATE``."""
    return rng.normal(size=size) - FAILURE_LOSS * (rng.random(size) < FAILURE_RATE)


# name -> (draw n differences, true mean)
DISTRIBUTIONS: dict[str, tuple[Callable[[np.random.Generator, int], np.ndarray], float]] = {
    "normal": (lambda rng, n: rng.normal(size=n), 0.0),
    "skewed": (lambda rng, n: rng.exponential(size=n) - 1.0, 0.0),
    "failures": (_failures, -FAILURE_RATE * FAILURE_LOSS),
}


def coverage(draw: Callable[[np.random.Generator, int], np.ndarray], true_mean: float, n: int, datasets: int,
             resamples: int, seed: int) -> float:
    """Return the fraction of ``datasets`` simulated data sets of n cases whose interval contains the true mean."""
    rng = np.random.default_rng(seed)
    covered = 0
    for index in range(datasets):
        low, high = bootstrap_ci(draw(rng, n)[None, :], n_resamples=resamples, confidence=CONFIDENCE, seed=index)
        covered += low <= true_mean <= high
    return covered / datasets


def minimum_cases(table: dict[str, dict[int, float]], targets: dict[str, float]) -> int | None:
    """Return the smallest n from which each distribution in ``targets`` covers at least its target; None if none."""
    ns = sorted(next(iter(table.values())))
    good = [all(table[d][n] >= target for d, target in targets.items()) for n in ns]
    return next((n for i, n in enumerate(ns) if all(good[i:])), None)


def _targets(targets: dict[str, float]) -> str:
    """``normal ≥ 90 %, skewed ≥ 85 %``."""
    return ", ".join(f"{d} ≥ {t:.0%}" for d, t in targets.items())


def markdown(table: dict[str, dict[int, float]]) -> str:
    """The coverage table: one row per n, one column per distribution."""
    names = list(table)
    lines = ["| cases | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for n in sorted(table[names[0]]):
        lines.append(f"| {n} | " + " | ".join(f"{table[d][n]:.3f}" for d in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=CASES, help="n values (default 2…20, 25, 30, 40)")
    parser.add_argument("--datasets", type=int, default=2000, help="simulated data sets per n and distribution")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/bootstrap_coverage.json")
    args = parser.parse_args()
    start = time.time()
    table: dict[str, dict[int, float]] = {name: {} for name in DISTRIBUTIONS}
    for n in args.cases:
        for name, (draw, true_mean) in DISTRIBUTIONS.items():
            table[name][n] = coverage(draw, true_mean, n, args.datasets, args.resamples, args.seed + n)
        print(f"n = {n}: " + ", ".join(f"{d} {table[d][n]:.3f}" for d in table) + f" ({time.time() - start:.0f} s)",
              flush=True)
    minimum, strict = minimum_cases(table, TARGETS), minimum_cases(table, STRICT_TARGETS)
    print("\n" + markdown(table) + "\n")
    print(f"minimum ({_targets(TARGETS)} from there on): {minimum}; with {_targets(STRICT_TARGETS)}: {strict}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"confidence": CONFIDENCE, "datasets": args.datasets, "resamples": args.resamples,
                   "seed": args.seed, "targets": TARGETS, "minimum_cases": minimum,
                   "strict_targets": STRICT_TARGETS, "strict_minimum_cases": strict,
                   "coverage": {d: {str(n): c for n, c in by_n.items()} for d, by_n in table.items()},
                   "seconds": time.time() - start}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
