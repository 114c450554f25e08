"""Make a study's report again from its case results, or one report from the case results of several runs.

Every ``nnunet-ext study`` writes ``cases.csv`` next to ``results.csv``: Dice and HD95 of each test case, region
and empty-mask policy for each repeat of each cell. From one or more of them this writes what the study writes
(``results.csv``, ``results.md``, ``paired_differences.csv``, ``cases.csv``, the plots), without predictions or
checkpoints, e.g. to join the repeats 0-4 of a grid trained on one machine with its repeats 5-9 trained on another:

    nnunet-ext report --cases runA/cases.csv runB/cases.csv --output merged

Refused, naming the files: a case result that two files both hold (the same repeat trained twice), a cell whose
repeats were trained with different plans or norms, files with different metric columns (evaluated with different
``--metrics``), and an output folder that already holds a report.
"""

from __future__ import annotations

import argparse
import csv
import os

from nnunet_ext.evaluation.report import BASELINE, FILES, CaseResult, cell_of, read_cases_csv, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--cases, --output, --baseline."""
    parser.add_argument("--cases", nargs="+", required=True, metavar="CSV",
                        help="cases.csv files written by nnunet-ext study (or by this command)")
    parser.add_argument("--output", required=True, help="folder for the report (must not hold one yet)")
    parser.add_argument("--baseline", default=BASELINE, help=f"model the others are paired with (default {BASELINE})")


def merged_cases(paths: list[str]) -> list[CaseResult]:
    """The case results of all ``paths``, in their order; refuse one result held twice, or one cell trained with
    different plans or norms, naming the files."""
    seen: dict[tuple, str] = {}
    built_with: dict[tuple, tuple[str, str, str]] = {}
    cases: list[CaseResult] = []
    columns: tuple[list[str], str] | None = None
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--cases: no file {path}")
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        columns = columns or (header, path)
        if header != columns[0]:  # e.g. --metrics in one run only: its means would cover some repeats only
            raise ValueError(f"{path} has the columns {', '.join(header)}, but {columns[1]} has "
                             f"{', '.join(columns[0])}: runs evaluated with different --metrics; evaluate them alike")
        for r in read_cases_csv(path):
            key = (cell_of(r), r.repeat, r.policy, r.region, r.case)
            if key in seen:
                raise ValueError(f"{path} and {seen[key]} both hold case {r.case!r}, region {r.region!r}, policy "
                                 f"{r.policy!r} of repeat {r.repeat} of {r.model} ({r.trainer}): the same repeat "
                                 f"trained twice; keep one of them")
            seen[key] = path
            plans = built_with.setdefault(cell_of(r), (r.plans, r.norm, path))
            if plans[:2] != (r.plans, r.norm):
                raise ValueError(f"{r.model} with {r.labels} labels was trained with {plans[0]} ({plans[1]}) in "
                                 f"{plans[2]} but with {r.plans} ({r.norm}) in {path}: not one cell")
            cases.append(r)
    if not cases:
        raise ValueError(f"--cases: no case results in {', '.join(paths)}")
    return cases


def run(args: argparse.Namespace) -> int:
    """Merge the case results and write the report."""
    present = [name for name in FILES.values() if os.path.exists(os.path.join(args.output, name))]
    if present:
        raise FileExistsError(f"--output {args.output} already holds a report ({', '.join(present)}); choose another "
                              f"folder or move it away")
    cases = merged_cases(args.cases)
    paths = write_report(cases, args.output, args.baseline)
    repeats = len({(cell_of(r), r.repeat) for r in cases})
    print(f"[report] {len(cases)} case results, {repeats} cell repeats from {len(args.cases)} file(s) -> "
          f"{paths['table']}")
    return 0
