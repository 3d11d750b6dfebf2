"""``bitray data ...``: example labelled sets for fine-tuning."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="write example labelled image sets")
    sets = parser.add_subparsers(title="data sets", metavar="SET")
    digits = sets.add_parser(
        "digits",
        help="scikit-learn's 1,797 8x8 handwritten digits as <output>/<digit>/<n>.png",
        description="Write scikit-learn's digits (1,797 real 8x8 handwritten digits, 10 classes) as a "
        "folder-per-class labelled set, local or on s3:// / gs://.",
    )
    digits.add_argument("--output", metavar="URI", required=True, help="root of the labelled set")
    digits.set_defaults(func=run_digits)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)


def run_digits(args: argparse.Namespace) -> int:
    from bitray.examples import write_digits

    count = write_digits(args.output)
    print(f"bitray: wrote {count} digit images under {args.output}/<digit>/")
    return 0
