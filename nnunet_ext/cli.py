"""``nnunet-ext``: the command line of nnunet_ext (one subcommand per tool, ``--help`` on each)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Expected user errors: what our validation of arguments, files and folders raises, with a one-line message
# that names what is wrong and how to fix it. The command prints that line only and exits with 2. Any other
# exception is a bug and keeps its traceback (exit 1). --debug shows the traceback of user errors too (e.g.
# for a ValueError that comes from inside a library rather than from our checks).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
# subcommand -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("nnunet_ext.commands.env", "print the export line that lets nnU-Net find our trainers"),
    "plan": ("nnunet_ext.commands.plan", "plan a dataset with one of our planners (nnU-Net's -pl cannot)"),
    "make-demo-dataset": ("nnunet_ext.datasets.synthetic", "write the synthetic BraTS-like demo dataset"),
    "demo": ("nnunet_ext.demo", "run the CPU demo end to end: data, plans, training, prediction, Dice"),
    "preprocess-unlabeled": ("nnunet_ext.data.preprocess_unlabeled",
                             "preprocess imagesUnlabeled with the dataset's plans (for ss* trainers)"),
    "evaluate": ("nnunet_ext.evaluation.evaluate", "Dice and HD95 per case and region (BraTS conventions)"),
    "convert-msd": ("nnunet_ext.datasets.msd", "convert MSD Task01_BrainTumour into an nnU-Net region dataset"),
    "paper-split": ("nnunet_ext.datasets.paper_split",
                    "write the paper's labeled ordering (and optionally its train/val split) for a dataset"),
    "self-train": ("nnunet_ext.selftrain",
                   "pseudo-label self-training per fold: teacher, pseudo labels of the unlabeled pool, student"),
    "study": ("nnunet_ext.study", "label-efficiency study: train a grid, predict, evaluate, tables and plots"),
    "report": ("nnunet_ext.commands.report", "a study's report again from its cases.csv, or from several merged"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the chosen subcommand's module is imported (keeps ``--help`` fast)."""
    parser = argparse.ArgumentParser(prog="nnunet-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show the traceback of every error")
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nnunet-ext`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args._module.run(args) or 0
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"nnunet-ext {args.command}: error: {error} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
